//! Live reload of the config file and the certificate files.
//!
//! Triggered by SIGHUP and by changes to those files. The directories
//! holding them are watched (Kubernetes swaps ConfigMap and Secret contents
//! by replacing a `..data` symlink, which a watch on the file itself would
//! miss), but only events naming a watched file or `..data` count: an access
//! log or anything else written beside the config causes no reload. Bursts
//! of events are debounced. A reload is all or nothing: the new config is parsed and
//! validated, the certificates read and checked, the policy compiled and
//! the resolver built before anything changes; then the new state replaces
//! the old in one atomic swap. Connections in flight keep the state they
//! started with. If anything fails, or the change needs a restart (listener
//! addresses and the like), the running config stays in force and the error
//! is logged and counted.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};

use crate::config::{self, Config};
use crate::observe::metrics::Metrics;
use crate::state::{Snapshot, StartError};

/// Quiet time after the last file event before reloading: Kubernetes
/// updates a volume in several steps, an editor saves in several writes.
pub const DEBOUNCE: Duration = Duration::from_millis(300);
/// Longest a burst of events may delay a reload.
pub const MAX_DEBOUNCE: Duration = Duration::from_secs(2);
/// First pause before trying a failed reload again; doubled each time.
pub const RETRY_FIRST: Duration = Duration::from_millis(500);
/// Times a failed reload is tried again (0.5 + 1 + 2 + 4 + 8 s).
pub const RETRIES: usize = 5;

/// Why a reload was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Invalid(String),
    #[error("changed {}: a restart is needed to apply this; the running config stays in force", .0.join(", "))]
    RestartNeeded(Vec<&'static str>),
}

/// The name Kubernetes gives the symlink it swaps to publish a new version
/// of a ConfigMap or Secret volume.
const K8S_DATA: &str = "..data";

/// The config in force and how to replace it.
pub struct Reloader {
    path: PathBuf,
    running: Mutex<Running>,
    snapshot: Arc<ArcSwap<Snapshot>>,
    metrics: Arc<Metrics>,
    /// Reload attempts so far, whatever their outcome (nothing changed
    /// included).
    attempts: AtomicU64,
}

struct Running {
    config: Config,
    /// Hash of the config text and the certificate files it names: a reload
    /// that would change nothing is skipped.
    inputs: u64,
}

impl Reloader {
    /// `text` is what `config` was parsed from: an edit made since then is
    /// a change, even if it landed before the watch started.
    pub fn new(
        path: PathBuf,
        config: Config,
        text: &str,
        snapshot: Arc<ArcSwap<Snapshot>>,
        metrics: Arc<Metrics>,
    ) -> Reloader {
        let inputs = fingerprint(text, &config);
        Reloader {
            path,
            running: Mutex::new(Running { config, inputs }),
            snapshot,
            metrics,
            attempts: AtomicU64::new(0),
        }
    }

    /// Reload attempts so far, whatever their outcome.
    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Relaxed)
    }

    /// Loads the file again and applies it if it is valid and changed
    /// anything. `Ok(true)`: a new config is in force.
    pub fn reload(&self, trigger: &str) -> Result<bool, ReloadError> {
        let result = self.attempt();
        self.report(trigger, &result);
        result
    }

    /// One reload attempt, neither logged nor counted.
    fn attempt(&self) -> Result<bool, ReloadError> {
        self.attempts.fetch_add(1, Ordering::Relaxed);
        let mut running = self.running.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.try_reload(&mut running)
    }

    /// Logs and counts the outcome of a reload (one per trigger, whatever
    /// the retries it took).
    fn report(&self, trigger: &str, result: &Result<bool, ReloadError>) {
        match result {
            Ok(true) => {
                self.metrics.reloaded(true);
                tracing::info!(trigger, config = %self.path.display(), "reloaded: new connections use the new config");
            }
            Ok(false) => tracing::debug!(trigger, "reload: nothing changed"),
            Err(e) => {
                self.metrics.reloaded(false);
                tracing::error!(trigger, config = %self.path.display(), error = %e, "reload refused; the running config stays in force");
            }
        }
    }

    fn try_reload(&self, running: &mut Running) -> Result<bool, ReloadError> {
        // Read once: what is parsed is exactly what is fingerprinted.
        let source = self.path.display().to_string();
        let text = config::read(&self.path).map_err(|e| ReloadError::Invalid(e.to_string()))?;
        let config = Config::parse(&text, &source, &config::base_dir(&self.path))
            .map_err(|e| ReloadError::Invalid(e.to_string()))?;
        let inputs = fingerprint(&text, &config);
        if inputs == running.inputs {
            return Ok(false);
        }
        let restart = config.restart_needed(&running.config);
        if !restart.is_empty() {
            return Err(ReloadError::RestartNeeded(restart));
        }
        let snapshot = Snapshot::build(&config, Some(&self.snapshot.load())).map_err(|e| match e {
            StartError::Material(e) => ReloadError::Invalid(config::locate(&text, &source, &e).to_string()),
            other => ReloadError::Invalid(other.to_string()),
        })?;
        if let Some(not_after) = snapshot.certificate_expiry() {
            self.metrics.certificate_expiry(not_after);
        }
        self.metrics.policy_entries(crate::policy::Policy::allow_labels(&config.policy));
        self.snapshot.store(Arc::new(snapshot));
        *running = Running { config, inputs };
        Ok(true)
    }

    /// What to watch: each directory holding the config file or a
    /// certificate file, with the names in it whose events count; and the
    /// parent of each such directory, where the directory's own name counts
    /// (`rm -rf certs && mv certs.new certs` replaces the watched directory,
    /// and with it the watch).
    pub fn watched(&self) -> BTreeMap<PathBuf, BTreeSet<OsString>> {
        let running = self.running.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut watched: BTreeMap<PathBuf, BTreeSet<OsString>> = BTreeMap::new();
        for file in std::iter::once(self.path.clone()).chain(running.config.material_files()) {
            let dir = parent(&file);
            let names = watched.entry(dir.clone()).or_default();
            names.extend(file.file_name().map(OsString::from));
            names.insert(K8S_DATA.into());
            if let Some(name) = dir.file_name().filter(|n| *n != "." && *n != "..") {
                watched.entry(parent(&dir)).or_default().insert(name.to_owned());
            }
        }
        watched
    }

    /// Watches the files and reloads after each debounced burst of changes,
    /// for as long as the returned task runs. A reload that fails is logged at
    /// once and tried again after [`RETRY_FIRST`], doubling, [`RETRIES`]
    /// times (a file caught half-written, a Secret mounted a moment after the
    /// ConfigMap), unless a new change comes first; the burst is counted
    /// once, with the outcome of its last attempt.
    pub fn watch(self: Arc<Self>) -> notify::Result<tokio::task::JoinHandle<()>> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<notify::Event>();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if let Ok(event) = event {
                let _ = tx.send(event);
            }
        })?;
        let mut watched = self.watched();
        for dir in watched.keys() {
            // A missing parent (a relative path's) is not an error.
            if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive)
                && dir.is_dir()
            {
                return Err(e);
            }
        }
        Ok(tokio::spawn(async move {
            let mut pending = rx.recv().await;
            while let Some(event) = pending.take() {
                if !counts(&event, &watched) {
                    pending = rx.recv().await;
                    continue;
                }
                // Debounce: wait until the files have been quiet, but not
                // forever (a writer that never stops must not block reloads).
                let burst = tokio::time::Instant::now();
                while let Ok(Some(_)) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                    if burst.elapsed() > MAX_DEBOUNCE {
                        break;
                    }
                }
                // A replaced directory needs its watch again; re-adding an
                // existing one is harmless.
                for dir in watched.keys() {
                    let _ = watcher.watch(dir, RecursiveMode::NonRecursive);
                }
                let mut retry = RETRY_FIRST;
                let mut result = self.attempt_blocking().await;
                if let Err(e) = &result {
                    // Said at once; counted once the retries are over.
                    tracing::error!(config = %self.path.display(), error = %e, retries = RETRIES,
                        "reload refused; trying again, the running config stays in force");
                }
                for _ in 0..RETRIES {
                    if result.is_ok() {
                        break;
                    }
                    // A new change ends the retries: it starts a burst of its
                    // own. Other events do not shorten the pause.
                    let until = tokio::time::Instant::now() + retry;
                    loop {
                        match tokio::time::timeout_at(until, rx.recv()).await {
                            Ok(Some(next)) if counts(&next, &watched) => {
                                pending = Some(next);
                                break;
                            }
                            Ok(None) => return,
                            Ok(Some(_)) => continue,
                            Err(_) => break,
                        }
                    }
                    if pending.is_some() {
                        break;
                    }
                    retry *= 2;
                    result = self.attempt_blocking().await;
                }
                self.report("file change", &result);
                if result.is_ok_and(|applied| applied) {
                    // The new config may name certificate files elsewhere.
                    watched = self.watched();
                    for dir in watched.keys() {
                        let _ = watcher.watch(dir, RecursiveMode::NonRecursive);
                    }
                }
                if pending.is_none() {
                    pending = rx.recv().await;
                }
            }
        }))
    }

    /// [`Reloader::attempt`] on a blocking thread (it reads files).
    async fn attempt_blocking(self: &Arc<Self>) -> Result<bool, ReloadError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.attempt())
            .await
            .unwrap_or_else(|_| Err(ReloadError::Invalid("the reload task failed".into())))
    }
}

/// Whether a file event is a change to one of the watched files: not a
/// read (ours included), and naming a watched file or `..data`.
fn counts(event: &notify::Event, watched: &BTreeMap<PathBuf, BTreeSet<OsString>>) -> bool {
    let read = matches!(
        event.kind,
        EventKind::Access(AccessKind::Open(_) | AccessKind::Read | AccessKind::Close(AccessMode::Read))
    );
    !read
        && event.paths.iter().any(|p| {
            let names = watched.get(&parent(p));
            p.file_name().is_some_and(|name| names.is_some_and(|names| names.contains(name)))
        })
}

/// The directory of a file, as the config resolves relative paths (`.` for
/// a bare file name), made absolute without `.` components (the watcher
/// reports `/cwd/./c.yaml` for `c.yaml`): paths then compare equal however
/// they were written.
fn parent(path: &Path) -> PathBuf {
    lexical(&config::base_dir(&lexical(path)))
}

/// `path` made absolute against the working directory, `.` components
/// dropped (symlinks are not resolved: `..data` swaps must stay visible).
fn lexical(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    absolute.components().filter(|c| !matches!(c, std::path::Component::CurDir)).collect()
}

/// Hash of everything a reload reads: the config text and the certificate
/// files it names. Unreadable files hash as absent (the reload then fails on
/// them with a proper message).
fn fingerprint(text: &str, config: &Config) -> u64 {
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    for file in config.material_files() {
        file.hash(&mut h);
        std::fs::read(&file).ok().hash(&mut h);
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, ModifyKind};

    fn event(kind: EventKind, path: &str) -> notify::Event {
        notify::Event::new(kind).add_path(PathBuf::from(path))
    }

    #[test]
    fn only_events_for_watched_files_count() {
        let mut watched = BTreeMap::new();
        watched.insert(PathBuf::from("/etc/snigress"), ["snigress.yaml", "..data"].map(OsString::from).into());
        watched.insert(PathBuf::from("/certs"), ["cert.pem"].map(OsString::from).into());
        let write = EventKind::Modify(ModifyKind::Any);
        assert!(counts(&event(write, "/etc/snigress/snigress.yaml"), &watched));
        assert!(counts(&event(EventKind::Create(CreateKind::Any), "/etc/snigress/..data"), &watched));
        assert!(counts(&event(write, "/certs/cert.pem"), &watched));
        assert!(!counts(&event(write, "/etc/snigress/access.log"), &watched), "a log beside the config");
        assert!(!counts(&event(write, "/certs/snigress.yaml"), &watched), "a name watched elsewhere");
        let read = EventKind::Access(AccessKind::Close(AccessMode::Read));
        assert!(!counts(&event(read, "/etc/snigress/snigress.yaml"), &watched), "our own reads");
    }
}
