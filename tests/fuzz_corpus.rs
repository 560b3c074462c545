//! Every file of the fuzz corpora (`fuzz/corpus/<target>/`, the seeds and
//! what the fuzzers kept) through the fuzz targets' own checks, on stable
//! Rust in `cargo test`: a finding, once its input is added to the corpus,
//! stays fixed.

use std::path::{Path, PathBuf};

fn files(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_client_hello_corpus_file_passes_the_fuzz_check() {
    let files = files("client_hello");
    assert!(files.len() >= 7, "the seed corpus is there ({} files)", files.len());
    for file in files {
        let data = std::fs::read(&file).expect("corpus file");
        let run = std::panic::catch_unwind(|| snigress::front::tls::testing::check_reader(&data));
        assert!(run.is_ok(), "{} fails the ClientHello check", file.display());
    }
}

#[test]
fn every_config_corpus_file_passes_the_fuzz_check() {
    let files = files("config");
    assert!(files.len() >= 2, "the seed corpus is there ({} files)", files.len());
    for file in files {
        let data = std::fs::read(&file).expect("corpus file");
        let Ok(text) = std::str::from_utf8(&data) else { continue };
        let run = std::panic::catch_unwind(|| snigress::config::testing::check_parse(text));
        assert!(run.is_ok(), "{} fails the config check", file.display());
    }
}
