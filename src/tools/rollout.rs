//! `snigress policy suggest` and `snigress policy diff`: turning an egress
//! lockdown on safely, from the access records the gateway wrote (JSON
//! lines, gzip accepted): a policy that allows what was seen, and what a
//! policy change would newly deny or allow on that traffic.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::Config;
use crate::identity::Principal;
use crate::name::ServerName;
use crate::policy::{Decision, Policy};

/// The fields of an access record these tools read.
#[derive(Deserialize)]
struct Line {
    #[serde(default)]
    start_time: String,
    #[serde(default)]
    sni: Option<String>,
    #[serde(default)]
    principal: Option<String>,
    #[serde(default)]
    decision: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    audit: Option<String>,
}

/// One record, as read.
struct Seen {
    time: String,
    name: ServerName,
    principal: Option<String>,
    /// Policy let it through (allowed, or refused for a reason policy did
    /// not give).
    policy_allowed: bool,
    decision_allowed: bool,
}

/// What was read: records, and lines that were not records.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub records: u64,
    pub skipped: u64,
}

/// Calls `f` on every record of `paths` with a valid name.
fn each_record(paths: &[PathBuf], mut f: impl FnMut(Seen)) -> Result<Counts, String> {
    let mut counts = Counts::default();
    for path in paths {
        let file = std::fs::File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let gzip = reader.fill_buf().map_err(|e| format!("{}: {e}", path.display()))?.starts_with(&[0x1f, 0x8b]);
        let input: Box<dyn BufRead> = if gzip {
            Box::new(BufReader::with_capacity(1 << 20, flate2::read::MultiGzDecoder::new(reader)))
        } else {
            Box::new(reader)
        };
        for line in input.lines() {
            let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
            let Ok(rec) = serde_json::from_str::<Line>(&line) else {
                counts.skipped += 1;
                continue;
            };
            let Some(name) = rec.sni.as_deref().and_then(|s| ServerName::parse(s).ok()) else {
                counts.skipped += 1;
                continue;
            };
            counts.records += 1;
            let refused_by_policy = rec.reason == "policy_denied" || rec.audit.as_deref() == Some("would_deny");
            f(Seen {
                time: rec.start_time,
                name,
                principal: rec.principal,
                policy_allowed: !refused_by_policy,
                decision_allowed: rec.decision == "allowed",
            });
        }
    }
    Ok(counts)
}

/// `policy suggest` options.
#[derive(Debug, Clone)]
pub struct SuggestOptions {
    pub per_identity: bool,
    pub min_connections: u64,
    /// Names under one registrable domain folded into `*.domain` from this
    /// many distinct names.
    pub wildcard_threshold: usize,
}

#[derive(Default)]
struct Tally {
    connections: u64,
    first: String,
    last: String,
}

impl Tally {
    fn add(&mut self, time: &str) {
        self.connections += 1;
        if self.first.is_empty() || time < self.first.as_str() {
            self.first = time.to_owned();
        }
        if time > self.last.as_str() {
            self.last = time.to_owned();
        }
    }

    fn merge(&mut self, other: &Tally) {
        self.connections += other.connections;
        if self.first.is_empty() || other.first < self.first {
            self.first.clone_from(&other.first);
        }
        if other.last > self.last {
            self.last.clone_from(&other.last);
        }
    }
}

/// A commented policy YAML that allows what the records show was let
/// through (allowed, and would-deny in audit mode).
pub fn suggest(paths: &[PathBuf], options: &SuggestOptions) -> Result<String, String> {
    // identity ("" for the global list) -> name -> tally
    let mut seen: BTreeMap<String, HashMap<ServerName, Tally>> = BTreeMap::new();
    let counts = each_record(paths, |s| {
        if !s.decision_allowed {
            return;
        }
        let who = if options.per_identity { s.principal.unwrap_or_default() } else { String::new() };
        seen.entry(who).or_default().entry(s.name).or_default().add(&s.time);
    })?;
    let mut out = format!(
        "# Suggested by snigress policy suggest from {} access records ({} other lines skipped).\n\
         # Review before use: every entry allows what was seen, nothing more.\npolicy:\n",
        counts.records, counts.skipped
    );
    let global = seen.remove("").unwrap_or_default();
    out.push_str("  allow:\n");
    let entries = fold(&global, options);
    if entries.is_empty() {
        out.push_str("    []\n");
    }
    for line in entries {
        let _ = writeln!(out, "    {line}");
    }
    let mut rules = String::new();
    let mut used = BTreeSet::new();
    for (i, (who, names)) in seen.iter().enumerate() {
        let entries = fold(names, options);
        if entries.is_empty() {
            continue;
        }
        let mut name = Principal::parse(who)
            .ok()
            .and_then(|p| Some(format!("{}-{}", p.namespace()?, p.service_account()?)))
            .unwrap_or_else(|| format!("caller-{i}"));
        // The same namespace and account in two trust domains: names stay unique.
        if !used.insert(name.clone()) {
            name = format!("{name}-{i}");
            used.insert(name.clone());
        }
        let _ = writeln!(rules, "    - name: {name}\n      principals: [\"{who}\"]\n      allow:");
        for line in entries {
            let _ = writeln!(rules, "        {line}");
        }
    }
    if !rules.is_empty() {
        out.push_str("  rules:\n");
        out.push_str(&rules);
    }
    Ok(out)
}

/// The allow entries for one caller's names: each registrable domain with
/// at least `wildcard_threshold` distinct names becomes `*.domain` (never a
/// wildcard over a public suffix: a registrable domain is one label more
/// than its suffix), the rest stay exact; entries under `min_connections`
/// are dropped.
fn fold(names: &HashMap<ServerName, Tally>, options: &SuggestOptions) -> Vec<String> {
    let mut by_domain: BTreeMap<String, Vec<&ServerName>> = BTreeMap::new();
    for name in names.keys() {
        let domain = psl::domain_str(name.as_str()).unwrap_or(name.as_str()).to_owned();
        by_domain.entry(domain).or_default().push(name);
    }
    let mut entries: BTreeMap<String, (Tally, usize)> = BTreeMap::new();
    for (domain, members) in by_domain {
        let under: Vec<&&ServerName> = members.iter().filter(|n| n.as_str() != domain).collect();
        let fold = options.wildcard_threshold > 0
            && under.len() >= options.wildcard_threshold
            && !crate::config::is_public_suffix(&domain);
        for n in &members {
            let key = if fold && n.as_str() != domain { format!("*.{domain}") } else { n.to_string() };
            let (tally, count) = entries.entry(key).or_default();
            if let Some(t) = names.get(*n) {
                tally.merge(t);
            }
            *count += 1;
        }
    }
    entries
        .into_iter()
        .filter(|(_, (t, _))| t.connections >= options.min_connections)
        .map(|(pattern, (t, count))| {
            let folded = if count > 1 { format!(", {count} names") } else { String::new() };
            format!(
                "- \"{pattern}\"  # {} connections{folded}, first {}, last {}",
                t.connections,
                if t.first.is_empty() { "?" } else { &t.first },
                if t.last.is_empty() { "?" } else { &t.last }
            )
        })
        .collect()
}

/// What `policy diff` found.
#[derive(Debug, Default)]
pub struct Diff {
    pub report: String,
    pub newly_denied: u64,
}

/// Replays the records through `new` (and `old`, or the decisions the
/// records carry) and reports what changes, by name and caller.
pub fn diff(new: &Config, old: Option<&Config>, paths: &[PathBuf]) -> Result<Diff, String> {
    let new_policy = Policy::compile(&new.policy);
    let old_policy = old.map(|c| Policy::compile(&c.policy));
    let allows = |p: &Policy, name: &ServerName, who: Option<&Principal>| {
        matches!(p.decide(name, who), Decision::Allowed(_)) || p.audits(who)
    };
    // (name, caller) -> connections, for each direction of change
    let mut denied: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut allowed: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut principals: HashMap<String, Option<Principal>> = HashMap::new();
    let counts = each_record(paths, |s| {
        let who_text = s.principal.clone().unwrap_or_default();
        let who = principals.entry(who_text.clone()).or_insert_with(|| Principal::parse(&who_text).ok()).clone();
        let before = match &old_policy {
            Some(p) => allows(p, &s.name, who.as_ref()),
            None => s.policy_allowed,
        };
        let after = allows(&new_policy, &s.name, who.as_ref());
        let key = (s.name.to_string(), if who_text.is_empty() { "(no identity)".to_owned() } else { who_text });
        match (before, after) {
            (true, false) => *denied.entry(key).or_default() += 1,
            (false, true) => *allowed.entry(key).or_default() += 1,
            _ => {}
        }
    })?;
    let mut report = String::new();
    let mut section = |title: &str, rows: &BTreeMap<(String, String), u64>| -> (u64, usize) {
        let total: u64 = rows.values().sum();
        let names: BTreeSet<&String> = rows.keys().map(|(n, _)| n).collect();
        let _ = writeln!(report, "{title}: {total} connections, {} names", names.len());
        for ((name, who), n) in rows {
            let _ = writeln!(report, "  {name}  {who}  {n}");
        }
        (total, names.len())
    };
    let (newly_denied, denied_names) = section("newly denied", &denied);
    let (newly_allowed, allowed_names) = section("newly allowed", &allowed);
    let _ = writeln!(
        report,
        "summary: {} records replayed ({} other lines skipped); {newly_denied} connections newly denied ({denied_names} names), {newly_allowed} newly allowed ({allowed_names} names)",
        counts.records, counts.skipped
    );
    Ok(Diff { report, newly_denied })
}

/// For `--access-log` values: every path must exist.
pub fn check_paths(paths: &[PathBuf]) -> Result<(), String> {
    match paths.iter().find(|p| !Path::new(p).is_file()) {
        Some(p) => Err(format!("--access-log {}: no such file", p.display())),
        None => Ok(()),
    }
}
