//! Live reload of the config file and the certificate files.
//!
//! Triggered by SIGHUP and by changes in the directories holding those
//! files (directories, not files: Kubernetes swaps ConfigMap and Secret
//! contents by replacing a `..data` symlink). Bursts of events are
//! debounced. A reload is all or nothing: the new config is parsed and
//! validated, the certificates read and checked, the policy compiled and
//! the resolver built before anything changes; then the new state replaces
//! the old in one atomic swap. Connections in flight keep the state they
//! started with. If anything fails, or the change needs a restart (listener
//! addresses and the like), the running config stays in force and the error
//! is logged and counted.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashSet};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecursiveMode, Watcher};

use crate::config::{Config, MtlsSource};
use crate::conn::State;
use crate::listener::StartError;
use crate::metrics::Metrics;

/// Quiet time after the last file event before reloading: Kubernetes
/// updates a volume in several steps, an editor saves in several writes.
pub const DEBOUNCE: Duration = Duration::from_millis(300);
/// Longest a burst of events may delay a reload.
pub const MAX_DEBOUNCE: Duration = Duration::from_secs(2);

/// Why a reload was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Invalid(String),
    #[error("changed {}: a restart is needed to apply this; the running config stays in force", .0.join(", "))]
    RestartNeeded(Vec<&'static str>),
}

/// The config in force and how to replace it.
pub struct Reloader {
    path: PathBuf,
    running: Mutex<Running>,
    state: Arc<ArcSwap<State>>,
    metrics: Arc<Metrics>,
}

struct Running {
    config: Config,
    /// Hash of the config text and the certificate files it names: a reload
    /// that would change nothing is skipped.
    inputs: u64,
}

impl Reloader {
    pub fn new(path: PathBuf, config: Config, state: Arc<ArcSwap<State>>, metrics: Arc<Metrics>) -> Reloader {
        let inputs = fingerprint(&std::fs::read_to_string(&path).unwrap_or_default(), &config);
        Reloader { path, running: Mutex::new(Running { config, inputs }), state, metrics }
    }

    /// Loads the file again and applies it if it is valid and changed
    /// anything. `Ok(true)`: a new config is in force.
    pub fn reload(&self, trigger: &str) -> Result<bool, ReloadError> {
        let mut running = self.running.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let result = self.try_reload(&mut running);
        match &result {
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
        result
    }

    fn try_reload(&self, running: &mut Running) -> Result<bool, ReloadError> {
        // Read once: what is parsed is exactly what is fingerprinted.
        let text = std::fs::read_to_string(&self.path)
            .map_err(|e| ReloadError::Invalid(format!("cannot read the config file {}: {e}", self.path.display())))?;
        let config = Config::parse(&text, &self.path.display().to_string(), &parent(&self.path))
            .map_err(|e| ReloadError::Invalid(e.to_string()))?;
        let inputs = fingerprint(&text, &config);
        if inputs == running.inputs {
            return Ok(false);
        }
        let restart = config.restart_needed(&running.config);
        if !restart.is_empty() {
            return Err(ReloadError::RestartNeeded(restart));
        }
        let state = State::build(&config).map_err(|e| match e {
            StartError::Config(e) => ReloadError::Invalid(e.to_string()),
            other => ReloadError::Invalid(other.to_string()),
        })?;
        if let Some(not_after) = state.outer.as_ref().and_then(|o| o.not_after) {
            self.metrics.certificate_expiry(not_after);
        }
        self.state.store(Arc::new(state));
        *running = Running { config, inputs };
        Ok(true)
    }

    /// The directories to watch: the config file's, and those of the
    /// certificate files (or the dev PKI).
    pub fn watched_dirs(&self) -> Vec<PathBuf> {
        let running = self.running.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut dirs = BTreeSet::new();
        dirs.insert(parent(&self.path));
        for file in material_files(&running.config) {
            dirs.insert(parent(&file));
        }
        dirs.into_iter().collect()
    }

    /// Watches the directories and reloads after each debounced burst of
    /// changes, for as long as the returned task runs.
    pub fn watch(self: Arc<Self>) -> notify::Result<tokio::task::JoinHandle<()>> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // Reads (ours included) are not changes.
            let relevant = !matches!(
                event,
                Ok(notify::Event {
                    kind: EventKind::Access(
                        AccessKind::Open(_) | AccessKind::Read | AccessKind::Close(AccessMode::Read)
                    ),
                    ..
                })
            );
            if relevant {
                let _ = tx.send(());
            }
        })?;
        let mut watching = HashSet::new();
        for dir in self.watched_dirs() {
            watcher.watch(&dir, RecursiveMode::NonRecursive)?;
            watching.insert(dir);
        }
        Ok(tokio::spawn(async move {
            while rx.recv().await.is_some() {
                // Debounce: wait until the directory has been quiet, but not
                // forever (another writer in the directory may never stop).
                let burst = tokio::time::Instant::now();
                while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {
                    if burst.elapsed() > MAX_DEBOUNCE {
                        break;
                    }
                }
                let me = self.clone();
                let applied = tokio::task::spawn_blocking(move || me.reload("file change").is_ok_and(|a| a))
                    .await
                    .unwrap_or(false);
                if applied {
                    // The new config may name certificate files elsewhere.
                    for dir in self.watched_dirs() {
                        if !watching.contains(&dir) && watcher.watch(&dir, RecursiveMode::NonRecursive).is_ok() {
                            watching.insert(dir);
                        }
                    }
                }
            }
        }))
    }
}

fn parent(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

fn material_files(config: &Config) -> Vec<PathBuf> {
    match config.mtls.as_ref().map(|m| &m.source) {
        Some(MtlsSource::Files(paths)) => vec![paths.cert.clone(), paths.key.clone(), paths.client_ca.clone()],
        Some(MtlsSource::DevPki(dir)) => {
            let paths = crate::devcerts::material_paths(dir);
            vec![paths.cert, paths.key, paths.client_ca]
        }
        None => Vec::new(),
    }
}

/// Hash of everything a reload reads: the config text and the certificate
/// files it names. Unreadable files hash as absent (the reload then fails on
/// them with a proper message).
fn fingerprint(text: &str, config: &Config) -> u64 {
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    for file in material_files(config) {
        file.hash(&mut h);
        std::fs::read(&file).ok().hash(&mut h);
    }
    h.finish()
}
