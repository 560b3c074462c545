//! Audit mode end to end: a name policy would refuse is let through and
//! recorded as such, per rule and globally; address vetting still refuses.

mod common;

use common::*;
use tokio::net::TcpStream;

async fn through_mtls(h: &Harness, id: &str, sni: &str) -> std::io::Result<Vec<u8>> {
    let outer = h.outer("mtls", id, &[]).await?;
    let tls = h.inner(outer, sni).await?;
    exchange(tls, b"a").await
}

async fn through_passthrough(h: &Harness, sni: &str) -> std::io::Result<Vec<u8>> {
    let tcp = TcpStream::connect(h.addr("passthrough")).await?;
    let tls = h.inner(tcp, sni).await?;
    exchange(tls, b"a").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_mode_lets_refusals_through_and_records_them() {
    let mut h = Harness::start().await;
    // The allow entries in force, as the connection counter's rule label names them.
    let text = scrape(h.metrics_addr).await;
    for rule in ["*.allowed.test", "default-team:*.team.test"] {
        assert_eq!(sum(&text, "snigress_policy_allow_entry", &[("rule", rule)]), 1.0, "{rule}\n{text}");
    }
    through_passthrough(&h, "a.allowed.test").await.expect("allowed");
    assert_eq!(h.record().await.matched_rule.as_deref(), Some("*.allowed.test"));
    h.wait_metric("snigress_connections_total", &[("rule", "*.allowed.test"), ("decision", "allowed")], 1.0).await;

    // A rule in audit mode: its callers' refusals pass, others' do not.
    let text = h.config_with(&Options::default());
    let per_rule = text.replace("      namespaces: [default]\n", "      namespaces: [default]\n      mode: audit\n");
    assert_ne!(per_rule, text);
    h.write_config(&per_rule);
    h.wait_metric("snigress_config_reloads_total", &[("result", "success")], 1.0).await;

    let back = through_mtls(&h, SLEEP, "a.unlisted.test").await.expect("audited, so through");
    assert_eq!(back, b"asni=a.unlisted.test\n");
    let r = h.record().await;
    assert_eq!(
        (r.decision, r.reason, r.audit, r.audit_reason),
        ("allowed", "allowed", Some("would_deny"), Some("policy_denied"))
    );
    assert_eq!(r.matched_rule, None, "no pattern matched: the default deny");

    let e = through_mtls(&h, OTHER_APP, "a.unlisted.test").await.expect_err("enforced for others");
    assert_eq!(alert_of(&e), Some(rustls::AlertDescription::AccessDenied), "{e}");
    let r = h.record().await;
    assert_eq!((r.decision, r.audit), ("denied", None));
    h.wait_metric("snigress_policy_audit_total", &[("sni", "a.unlisted.test"), ("source", "default/sleep")], 1.0).await;

    // Globally: every caller, deny patterns included; vetting still refuses.
    let global = text.replace("policy:\n", "policy:\n  mode: audit\n");
    h.write_config(&global);
    h.wait_metric("snigress_config_reloads_total", &[("result", "success")], 2.0).await;
    through_passthrough(&h, "blocked.allowed.test").await.expect("a deny pattern, audited");
    let r = h.record().await;
    assert_eq!(
        (r.decision, r.audit, r.matched_rule.as_deref()),
        ("allowed", Some("would_deny"), Some("blocked.allowed.test"))
    );
    let e = through_passthrough(&h, "metadata.allowed.test").await.expect_err("vetting is safety, not policy");
    assert_eq!(alert_of(&e), Some(rustls::AlertDescription::AccessDenied), "{e}");
    let r = h.record().await;
    assert_eq!((r.reason, r.audit), ("address_refused", None));

    // A rule that says enforce keeps its callers enforced under a global audit.
    let enforce = global.replace("      namespaces: [default]\n", "      namespaces: [default]\n      mode: enforce\n");
    h.write_config(&enforce);
    h.wait_metric("snigress_config_reloads_total", &[("result", "success")], 3.0).await;
    through_mtls(&h, SLEEP, "a.unlisted.test").await.expect_err("enforced");
    assert_eq!(h.record().await.decision, "denied");
    through_mtls(&h, OTHER_APP, "a.unlisted.test").await.expect("audited");
    assert_eq!(h.record().await.audit, Some("would_deny"));
}
