//! Property tests: whatever bytes, names or YAML arrive, the parsers end in
//! a result (never a panic), the ClientHello reader never asks for more
//! than its cap and a complete hello lies within what was fed, a validated
//! name validates to itself again, and the policy's trie decides as the
//! one-pattern-at-a-time reference does.

use std::path::Path;

use proptest::prelude::*;
use snigress::config::Config;
use snigress::front::tls::testing::{hello_for, refragment};
use snigress::front::tls::{HelloReader, Progress};
use snigress::identity::Principal;
use snigress::name::ServerName;
use snigress::policy::{Decision, Pattern, Policy, PolicySpec};

const CAP: usize = 4096;

/// Feeds `bytes` to a reader in pieces of `step`, as reads would deliver
/// them; returns the final progress. Asserts the cap is honoured.
fn feed(bytes: &[u8], step: usize) -> Result<Progress, snigress::front::tls::HelloError> {
    let mut reader = HelloReader::new(CAP);
    let mut end = 0;
    loop {
        end = (end + step.max(1)).min(bytes.len());
        let progress = reader.advance(&bytes[..end]);
        match &progress {
            Ok(Progress::Complete(hello)) => {
                assert!(hello.len <= end && hello.len <= CAP, "a hello of {} bytes from {end} fed", hello.len);
                return progress;
            }
            Ok(Progress::NeedMore) if end < bytes.len() => continue,
            Ok(Progress::NeedMore) => {
                assert!(end < CAP, "asked for more past the cap ({end} bytes)");
                return progress;
            }
            _ => return progress,
        }
    }
}

fn corpus() -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "bin"))
                .filter_map(|e| std::fs::read(e.path()).ok())
                .collect()
        })
        .unwrap_or_default();
    out.push(hello_for("a.example.com"));
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_end_in_a_result(bytes in proptest::collection::vec(any::<u8>(), 0..6000), step in 1usize..600) {
        let _ = feed(&bytes, step);
    }

    #[test]
    fn tls_looking_bytes_end_in_a_result(
        body in proptest::collection::vec(any::<u8>(), 0..5000),
        len in any::<u16>(),
        step in 1usize..300,
    ) {
        // A handshake record header in front, so the parser goes deep.
        let mut bytes = vec![22, 3, 1];
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.push(1);
        bytes.extend_from_slice(&body);
        let _ = feed(&bytes, step);
    }

    #[test]
    fn mutated_real_hellos_end_in_a_result(
        which in any::<prop::sample::Index>(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        cut in any::<prop::sample::Index>(),
        fragment in 1usize..400,
        step in 1usize..200,
    ) {
        let corpus = corpus();
        let mut hello = refragment(&corpus[which.index(corpus.len())], fragment);
        for (at, value) in flips {
            let i = at.index(hello.len());
            hello[i] = value;
        }
        let keep = cut.index(hello.len() + 1);
        hello.truncate(keep.max(1));
        let _ = feed(&hello, step);
    }

    #[test]
    fn arbitrary_names_never_panic_the_validator_or_the_matcher(
        raw in proptest::collection::vec(any::<u8>(), 0..300),
        text in "[a-zA-Z0-9.*_-]{0,80}",
    ) {
        let spec = PolicySpec {
            allow: vec![Pattern::parse("*.example.com").unwrap(), Pattern::parse("api.example.org").unwrap()],
            deny: vec![Pattern::parse("bad.example.com").unwrap()],
            rules: Vec::new(),
            mode: Default::default(),
        };
        let policy = Policy::compile(&spec);
        let principal = Principal::parse("spiffe://cluster.local/ns/a/sa/b").ok();
        for name in [ServerName::from_bytes(&raw), ServerName::parse(&text)].into_iter().flatten() {
            prop_assert_eq!(ServerName::parse(name.as_str()), Ok(name.clone()), "normalised once, stable after");
            let allowed = matches!(policy.decide(&name, principal.as_ref()), Decision::Allowed(_));
            let reference =
                spec.allow.iter().any(|p| p.matches(&name)) && !spec.deny.iter().any(|p| p.matches(&name));
            prop_assert_eq!(allowed, reference, "{}", name);
        }
        // A pattern built from a name matches it exactly, and its wildcard
        // form matches it one label deeper only.
        if let Ok(name) = ServerName::parse(&text) {
            let exact = Pattern::parse(name.as_str()).expect("a valid name is a valid pattern");
            prop_assert!(exact.matches(&name));
            let wildcard = Pattern::parse(&format!("*.{name}")).expect("wildcard");
            prop_assert!(!wildcard.matches(&name));
            if let Ok(deeper) = ServerName::parse(&format!("x.{name}")) {
                prop_assert!(wildcard.matches(&deeper));
            }
        }
        let _ = Pattern::parse(&text);
        let _ = Principal::parse(&text);
    }

    #[test]
    fn arbitrary_yaml_never_panics_config_loading(text in "\\PC{0,400}") {
        let _ = Config::parse(&text, "fuzz.yaml", Path::new("."));
    }

    #[test]
    fn mutated_configs_never_panic(
        cut in 0usize..1000,
        insert in "[ :\\-\\[\\]{}\"'#a-z0-9\\n]{0,12}",
    ) {
        let good = "listeners:\n  - name: a\n    address: 127.0.0.1:8443\n    mode: passthrough\npolicy:\n  allow: [\"*.example.com\"]\n  rules:\n    - name: r\n      namespaces: [x]\n      allow: [a.b]\ntimeouts:\n  idle: 5m\nresolver:\n  allow_cidrs: [10.0.0.0/8]\n";
        let at = cut % (good.len() + 1);
        let at = (0..=at).rev().find(|i| good.is_char_boundary(*i)).unwrap_or(0);
        let text = format!("{}{}{}", &good[..at], insert, &good[at..]);
        let _ = Config::parse(&text, "fuzz.yaml", Path::new("."));
    }
}
