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

/// Runs `check` on every file of `target`'s corpus, which must hold at
/// least `seeds` files.
fn replay(target: &str, seeds: usize, check: impl Fn(&[u8]) + std::panic::RefUnwindSafe) {
    let files = files(target);
    assert!(files.len() >= seeds, "the {target} seed corpus is there ({} files)", files.len());
    for file in files {
        let data = std::fs::read(&file).expect("corpus file");
        let run = std::panic::catch_unwind(|| check(&data));
        assert!(run.is_ok(), "{} fails the {target} check", file.display());
    }
}

#[test]
fn every_client_hello_corpus_file_passes_the_fuzz_check() {
    replay("client_hello", 7, snigress::front::tls::testing::check_reader);
}

#[test]
fn every_config_corpus_file_passes_the_fuzz_check() {
    replay("config", 2, |data| {
        if let Ok(text) = std::str::from_utf8(data) {
            snigress::config::testing::check_parse(text);
        }
    });
}

#[test]
fn every_proxy_header_corpus_file_passes_the_fuzz_check() {
    replay("proxy_header", 7, snigress::arrive::proxy::testing::check);
}

#[test]
fn every_http_head_corpus_file_passes_the_fuzz_check() {
    replay("http_head", 8, snigress::front::http::testing::check);
}
