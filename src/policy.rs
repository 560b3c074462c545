//! The allow/deny policy: patterns compiled into a label trie, per-identity
//! rules, and `decide`.
//!
//! Semantics (documented in the example config):
//! - `example.com` matches that name only; `*.example.com` matches any name
//!   with one or more labels in front of `example.com`, never `example.com`
//!   itself and never `evilexample.com` (matching is on whole labels).
//! - Names and patterns are compared after normalisation (lower case, one
//!   trailing dot removed), so matching is case-insensitive.
//! - A deny that matches wins over any allow, globally and in rules alike; a
//!   rule's entries apply only to the callers it selects; nothing matched
//!   means deny.
//!
//! The trie is keyed by labels from the right, so a lookup costs one hash
//! probe per label of the name, whatever the number of patterns.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use crate::identity::Principal;
use crate::name::{NameError, ServerName};

/// An allow or deny pattern as written in the config, validated.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    /// `*.suffix` when true, the exact name otherwise.
    wildcard: bool,
    /// The exact name, or the suffix after `*.`.
    name: ServerName,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("invalid pattern {0:?}: '*' may only be the whole first label, as in \"*.example.com\"")]
    Wildcard(String),
    #[error("invalid pattern {0:?}: {1}")]
    Name(String, NameError),
}

impl Pattern {
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        let (wildcard, rest) = match text.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        if rest.contains('*') {
            return Err(PatternError::Wildcard(text.to_owned()));
        }
        let name = ServerName::parse(rest).map_err(|e| PatternError::Name(text.to_owned(), e))?;
        Ok(Pattern { wildcard, name })
    }

    /// The suffix of a `*.` pattern; `None` for an exact name.
    pub fn wildcard_suffix(&self) -> Option<&ServerName> {
        self.wildcard.then_some(&self.name)
    }

    /// Whether this single pattern matches `name`: the reference the trie's
    /// answers are tested against, and a route's name match (a route has a
    /// few patterns; policy, with thousands, uses the trie).
    pub fn matches(&self, name: &ServerName) -> bool {
        if !self.wildcard {
            return self.name == *name;
        }
        let (n, s) = (name.as_str(), self.name.as_str());
        n.len() > s.len() + 1 && n.ends_with(s) && n.as_bytes()[n.len() - s.len() - 1] == b'.'
    }
}

impl std::str::FromStr for Pattern {
    type Err = PatternError;

    fn from_str(text: &str) -> Result<Self, PatternError> {
        Pattern::parse(text)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        f.write_str(self.name.as_str())
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({self})")
    }
}

/// Which callers a per-identity rule applies to. A caller is selected when it
/// matches any one entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    /// SPIFFE IDs without the scheme (`cluster.local/ns/a/sa/b`).
    pub principals: HashSet<String>,
    pub namespaces: HashSet<String>,
    /// `namespace/service-account` pairs.
    pub service_accounts: HashSet<(String, String)>,
}

impl Selector {
    pub fn is_empty(&self) -> bool {
        self.principals.is_empty() && self.namespaces.is_empty() && self.service_accounts.is_empty()
    }

    pub(crate) fn selects(&self, p: &Principal) -> bool {
        if self.principals.contains(p.without_scheme()) {
            return true;
        }
        let Some(ns) = p.namespace() else {
            return false;
        };
        if self.namespaces.contains(ns) {
            return true;
        }
        match p.service_account() {
            Some(sa) if !self.service_accounts.is_empty() => {
                // Allocation-free lookup would need a borrowed tuple key; the
                // set is small and rules are few, so a scan is cheaper anyway.
                self.service_accounts.iter().any(|(n, s)| n == ns && s == sa)
            }
            _ => false,
        }
    }
}

/// The policy as configured (validated, not yet compiled).
#[derive(Debug, Clone, Default)]
pub struct PolicySpec {
    pub allow: Vec<Pattern>,
    pub deny: Vec<Pattern>,
    pub rules: Vec<RuleSpec>,
    /// `policy.mode`.
    pub mode: Mode,
}

#[derive(Debug, Clone)]
pub struct RuleSpec {
    pub name: String,
    pub from: Selector,
    pub allow: Vec<Pattern>,
    pub deny: Vec<Pattern>,
    /// `rules[].mode`: audit puts the callers this rule selects in audit,
    /// enforce keeps them enforced under `policy.mode: audit`; `None`:
    /// `policy.mode`.
    pub mode: Option<Mode>,
}

/// Whether refusals are enforced, or only recorded (`audit`): the rollout
/// switch of an egress lockdown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

/// One pattern that matched, with where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    pub action: Action,
    pub pattern: Arc<str>,
    /// The rule's name, or `None` for the global lists.
    pub rule: Option<Arc<str>>,
    /// The form written to the access log's `matched_rule` and the metrics'
    /// `rule`: the pattern, with the rule name in front when it came from a
    /// per-identity rule. Made once, when the policy is compiled.
    pub label: Arc<str>,
}

impl Match {
    pub fn label(&self) -> String {
        self.label.to_string()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allowed(Match),
    /// A deny pattern matched.
    Denied(Match),
    /// No pattern matched.
    NotAllowed,
}

#[derive(Debug)]
struct Entry {
    action: Action,
    /// Index into `Policy::rules`, or `None` for the global lists.
    rule: Option<usize>,
    pattern: Arc<str>,
    /// `Match::label`.
    label: Arc<str>,
}

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    /// Patterns equal to the path to this node.
    exact: Vec<Entry>,
    /// `*.` patterns whose suffix is the path to this node.
    wildcard: Vec<Entry>,
}

#[derive(Debug)]
struct Rule {
    name: Arc<str>,
    from: Selector,
    mode: Option<Mode>,
}

/// The compiled policy.
#[derive(Debug)]
pub struct Policy {
    root: Node,
    rules: Vec<Rule>,
    audit: bool,
}

impl Policy {
    pub fn compile(spec: &PolicySpec) -> Policy {
        let mut policy = Policy { root: Node::default(), rules: Vec::new(), audit: spec.mode == Mode::Audit };
        policy.insert_all(&spec.allow, Action::Allow, None);
        policy.insert_all(&spec.deny, Action::Deny, None);
        for (i, rule) in spec.rules.iter().enumerate() {
            policy.rules.push(Rule { name: rule.name.as_str().into(), from: rule.from.clone(), mode: rule.mode });
            policy.insert_all(&rule.allow, Action::Allow, Some(i));
            policy.insert_all(&rule.deny, Action::Deny, Some(i));
        }
        policy
    }

    fn insert_all(&mut self, patterns: &[Pattern], action: Action, rule: Option<usize>) {
        for p in patterns {
            let mut node = &mut self.root;
            for label in p.name.labels_rev() {
                node = node.children.entry(label.into()).or_default();
            }
            let pattern: Arc<str> = p.to_string().into();
            let label = match rule {
                None => pattern.clone(),
                Some(i) => format!("{}:{pattern}", self.rules[i].name).into(),
            };
            let entry = Entry { action, rule, pattern, label };
            if p.wildcard { &mut node.wildcard } else { &mut node.exact }.push(entry);
        }
    }

    /// Calls `f` for every entry whose pattern matches `name` and whose scope
    /// applies to `principal`, from the least to the most specific.
    fn walk<'a>(&'a self, name: &ServerName, principal: Option<&Principal>, mut f: impl FnMut(&'a Entry)) {
        let applies = |e: &Entry| match e.rule {
            None => true,
            Some(i) => principal.is_some_and(|p| self.rules[i].from.selects(p)),
        };
        let mut node = &self.root;
        let mut labels = name.labels_rev().peekable();
        while let Some(label) = labels.next() {
            match node.children.get(label) {
                Some(child) => node = child,
                None => return,
            }
            if labels.peek().is_some() {
                node.wildcard.iter().filter(|e| applies(e)).for_each(&mut f);
            } else {
                node.exact.iter().filter(|e| applies(e)).for_each(&mut f);
            }
        }
    }

    fn to_match(&self, e: &Entry) -> Match {
        Match {
            action: e.action,
            pattern: e.pattern.clone(),
            rule: e.rule.map(|i| self.rules[i].name.clone()),
            label: e.label.clone(),
        }
    }

    /// Decides for one name and caller. Deny wins; the reported pattern is the
    /// most specific of the winning kind.
    pub fn decide(&self, name: &ServerName, principal: Option<&Principal>) -> Decision {
        let (mut allow, mut deny) = (None, None);
        self.walk(name, principal, |e| match e.action {
            Action::Allow => allow = Some(e),
            Action::Deny => deny = Some(e),
        });
        match (deny, allow) {
            (Some(d), _) => Decision::Denied(self.to_match(d)),
            (None, Some(a)) => Decision::Allowed(self.to_match(a)),
            (None, None) => Decision::NotAllowed,
        }
    }

    /// Whether a refusal for this caller is only recorded: a rule in audit
    /// mode selects it, or `policy.mode` is audit and no rule that selects
    /// it says enforce.
    pub fn audits(&self, principal: Option<&Principal>) -> bool {
        let mut modes =
            self.rules.iter().filter(|r| principal.is_some_and(|p| r.from.selects(p))).filter_map(|r| r.mode);
        let (mut audit, mut enforce) = (false, false);
        for m in &mut modes {
            match m {
                Mode::Audit => audit = true,
                Mode::Enforce => enforce = true,
            }
        }
        audit || (self.audit && !enforce)
    }

    /// Every allow entry, as `Match::label` writes it (the metrics' `rule`).
    pub fn allow_labels(spec: &PolicySpec) -> Vec<String> {
        let global = spec.allow.iter().map(ToString::to_string);
        let rules = spec.rules.iter().flat_map(|r| r.allow.iter().map(move |p| format!("{}:{p}", r.name)));
        global.chain(rules).collect()
    }

    /// Every matching pattern, least specific first: for `snigress check`.
    pub fn explain(&self, name: &ServerName, principal: Option<&Principal>) -> Vec<Match> {
        let mut all = Vec::new();
        self.walk(name, principal, |e| all.push(self.to_match(e)));
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pats(list: &[&str]) -> Vec<Pattern> {
        list.iter().map(|p| Pattern::parse(p).unwrap()).collect()
    }

    fn name(n: &str) -> ServerName {
        ServerName::parse(n).unwrap()
    }

    #[test]
    fn pattern_validation() {
        for ok in ["example.com", "*.example.com", "*.com", "EXAMPLE.com.", "*.xn--bcher-kva.example"] {
            assert!(Pattern::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "*",
            "*.",
            "**.example.com",
            "a.*.example.com",
            "*example.com",
            "example.*",
            "*.*.example.com",
            "ex*ample.com",
            "",
            ".example.com",
            "*..example.com",
            "10.0.0.1",
            "*.10.0.0.1",
            "exa mple.com",
        ] {
            assert!(Pattern::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Pattern::parse("*.EXAMPLE.Com.").unwrap().to_string(), "*.example.com");
    }

    #[test]
    fn wildcard_semantics_table() {
        let table = [
            ("*.example.com", "a.example.com", true),
            ("*.example.com", "a.b.example.com", true),
            ("*.example.com", "A.B.EXAMPLE.COM.", true),
            ("*.example.com", "example.com", false),
            ("*.example.com", "evilexample.com", false),
            ("*.example.com", "a.evilexample.com", false),
            ("*.example.com", "example.com.evil.net", false),
            ("*.example.com", "a.example.co", false),
            ("example.com", "example.com", true),
            ("example.com", "EXAMPLE.COM.", true),
            ("example.com", "a.example.com", false),
            ("example.com", "notexample.com", false),
            ("*.com", "example.com", true),
            ("*.com", "com", false),
        ];
        for (pattern, n, want) in table {
            let p = Pattern::parse(pattern).unwrap();
            assert_eq!(p.matches(&name(n)), want, "{pattern} vs {n}");
            let policy = Policy::compile(&PolicySpec { allow: vec![p], ..Default::default() });
            let got = matches!(policy.decide(&name(n), None), Decision::Allowed(_));
            assert_eq!(got, want, "trie: {pattern} vs {n}");
        }
    }

    #[test]
    fn deny_wins_and_no_match_denies() {
        let policy = Policy::compile(&PolicySpec {
            allow: pats(&["*.wikipedia.org", "en.wikipedia.org"]),
            deny: pats(&["en.wikipedia.org"]),
            rules: vec![],
            mode: Mode::Enforce,
        });
        match policy.decide(&name("de.wikipedia.org"), None) {
            Decision::Allowed(m) => assert_eq!(&*m.pattern, "*.wikipedia.org"),
            other => panic!("{other:?}"),
        }
        match policy.decide(&name("EN.wikipedia.org"), None) {
            Decision::Denied(m) => assert_eq!(&*m.pattern, "en.wikipedia.org"),
            other => panic!("{other:?}"),
        }
        assert_eq!(policy.decide(&name("wikipedia.org"), None), Decision::NotAllowed);
        assert_eq!(policy.decide(&name("example.com"), None), Decision::NotAllowed);
        // A wildcard deny covers deeper names even when an exact allow exists.
        let policy = Policy::compile(&PolicySpec {
            allow: pats(&["a.b.example.com"]),
            deny: pats(&["*.example.com"]),
            rules: vec![],
            mode: Mode::Enforce,
        });
        assert!(matches!(policy.decide(&name("a.b.example.com"), None), Decision::Denied(_)));
    }

    #[test]
    fn most_specific_allow_is_reported() {
        let policy = Policy::compile(&PolicySpec {
            allow: pats(&["*.com", "*.example.com", "api.example.com"]),
            ..Default::default()
        });
        let pattern = |n| match policy.decide(&name(n), None) {
            Decision::Allowed(m) => m.pattern.to_string(),
            other => panic!("{other:?}"),
        };
        assert_eq!(pattern("api.example.com"), "api.example.com");
        assert_eq!(pattern("www.example.com"), "*.example.com");
        assert_eq!(pattern("other.com"), "*.com");
    }

    #[test]
    fn rules_apply_only_to_selected_callers() {
        let p = |s| Principal::parse(s).unwrap();
        let checkout = p("spiffe://cluster.local/ns/payments/sa/checkout");
        let refunds = p("spiffe://cluster.local/ns/payments/sa/refunds");
        let web = p("spiffe://cluster.local/ns/web/sa/frontend");
        let ci = p("spiffe://cluster.local/ns/ci/sa/runner");
        let spire = p("spiffe://cluster.local/custom/path");
        let policy = Policy::compile(&PolicySpec {
            allow: pats(&["*.wikipedia.org"]),
            deny: pats(&["evil.example"]),
            rules: vec![
                RuleSpec {
                    name: "stripe".into(),
                    from: Selector {
                        service_accounts: [("payments".into(), "checkout".into())].into(),
                        ..Default::default()
                    },
                    allow: pats(&["api.stripe.com", "evil.example"]),
                    deny: vec![],
                    mode: None,
                },
                RuleSpec {
                    name: "web".into(),
                    from: Selector { namespaces: ["web".into()].into(), ..Default::default() },
                    allow: pats(&["*.cdn.example"]),
                    deny: pats(&["de.wikipedia.org"]),
                    mode: None,
                },
                RuleSpec {
                    name: "ci".into(),
                    from: Selector {
                        principals: ["cluster.local/ns/ci/sa/runner".into(), "cluster.local/custom/path".into()].into(),
                        ..Default::default()
                    },
                    allow: pats(&["github.com"]),
                    deny: vec![],
                    mode: None,
                },
            ],
            mode: Mode::Enforce,
        });
        let stripe = name("api.stripe.com");
        match policy.decide(&stripe, Some(&checkout)) {
            Decision::Allowed(m) => assert_eq!(m.label(), "stripe:api.stripe.com"),
            other => panic!("{other:?}"),
        }
        assert_eq!(policy.decide(&stripe, Some(&refunds)), Decision::NotAllowed);
        assert_eq!(policy.decide(&stripe, None), Decision::NotAllowed);
        // A global deny beats a rule's allow.
        assert!(matches!(policy.decide(&name("evil.example"), Some(&checkout)), Decision::Denied(_)));
        // A rule's deny applies to its callers only.
        assert!(matches!(policy.decide(&name("de.wikipedia.org"), Some(&web)), Decision::Denied(_)));
        assert!(matches!(policy.decide(&name("de.wikipedia.org"), Some(&ci)), Decision::Allowed(_)));
        assert!(matches!(policy.decide(&name("x.cdn.example"), Some(&web)), Decision::Allowed(_)));
        assert!(matches!(policy.decide(&name("github.com"), Some(&ci)), Decision::Allowed(_)));
        assert!(matches!(policy.decide(&name("github.com"), Some(&spire)), Decision::Allowed(_)));
        assert_eq!(policy.decide(&name("github.com"), Some(&web)), Decision::NotAllowed);
    }

    #[test]
    fn explain_lists_every_match() {
        let policy = Policy::compile(&PolicySpec {
            allow: pats(&["*.wikipedia.org"]),
            deny: pats(&["en.wikipedia.org"]),
            rules: vec![],
            mode: Mode::Enforce,
        });
        let all = policy.explain(&name("en.wikipedia.org"), None);
        let got: Vec<_> = all.iter().map(|m| (m.action, m.pattern.to_string())).collect();
        assert_eq!(got, [(Action::Allow, "*.wikipedia.org".into()), (Action::Deny, "en.wikipedia.org".into())]);
    }

    #[test]
    fn many_patterns_compile_and_match() {
        let allow: Vec<Pattern> =
            (0..10_000).map(|i| Pattern::parse(&format!("*.svc{i}.example.com")).unwrap()).collect();
        let policy = Policy::compile(&PolicySpec { allow, ..Default::default() });
        assert!(matches!(policy.decide(&name("a.svc9999.example.com"), None), Decision::Allowed(_)));
        assert_eq!(policy.decide(&name("a.svc10000.example.com"), None), Decision::NotAllowed);
    }
}
