//! Per-identity limits: how many connections one caller (an mTLS or a
//! PROXY-header identity) may hold open, and how fast it may open new ones
//! (a token bucket). The state outlives reloads and stays bounded: at most
//! [`MAX_TRACKED`] identities; past that, identities holding nothing are
//! forgotten first, and when none can be, a new identity goes untracked
//! rather than growing memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Most identities tracked at once.
pub const MAX_TRACKED: usize = 100_000;

/// `limits.connection_rate_per_identity`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// New connections per second, on average.
    pub per_second: f64,
    /// Most connections at once after a quiet period.
    pub burst: f64,
}

/// The limits in force (from the config snapshot).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Settings {
    pub max_connections: Option<usize>,
    pub rate: Option<Rate>,
}

/// Why a caller's connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It holds `max_connections_per_identity` already.
    Connections(usize),
    /// Its token bucket is empty.
    Rate,
}

#[derive(Debug)]
struct Entry {
    active: usize,
    tokens: f64,
    refilled: Instant,
}

/// Every caller's counts.
#[derive(Debug, Default)]
pub struct IdentityLimits {
    entries: Mutex<HashMap<Arc<str>, Entry>>,
}

/// A connection's place in its caller's count, given back on drop.
#[derive(Debug)]
pub struct Held {
    limits: Arc<IdentityLimits>,
    identity: Arc<str>,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut entries = self.limits.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = entries.get_mut(&self.identity) {
            e.active = e.active.saturating_sub(1);
        }
    }
}

impl IdentityLimits {
    /// Admits one new connection of `identity` under `settings`: a place in
    /// its count (`None` when no limit needs one), or why not.
    pub fn admit(self: &Arc<Self>, identity: &str, settings: Settings) -> Result<Option<Held>, Refusal> {
        if settings == Settings::default() {
            return Ok(None);
        }
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if !entries.contains_key(identity) && entries.len() >= MAX_TRACKED {
            // Forget identities that hold nothing and have a full bucket
            // (they would be admitted as new anyway).
            let full = settings.rate.map_or(0.0, |r| r.burst);
            entries.retain(|_, e| e.active > 0 || refill(e, settings.rate, now) < full);
            if entries.len() >= MAX_TRACKED {
                return Ok(None);
            }
        }
        let identity: Arc<str> = identity.into();
        let burst = settings.rate.map_or(0.0, |r| r.burst);
        let entry = entries.entry(identity.clone()).or_insert(Entry { active: 0, tokens: burst, refilled: now });
        if let Some(max) = settings.max_connections
            && entry.active >= max
        {
            return Err(Refusal::Connections(max));
        }
        if settings.rate.is_some() {
            entry.tokens = refill(entry, settings.rate, now);
            entry.refilled = now;
            if entry.tokens < 1.0 {
                return Err(Refusal::Rate);
            }
            entry.tokens -= 1.0;
        }
        entry.active += 1;
        Ok(Some(Held { limits: self.clone(), identity }))
    }
}

/// The bucket's tokens at `now`.
fn refill(e: &Entry, rate: Option<Rate>, now: Instant) -> f64 {
    match rate {
        Some(r) => (e.tokens + now.duration_since(e.refilled).as_secs_f64() * r.per_second).min(r.burst),
        None => e.tokens,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_and_rate_per_identity() {
        let limits = Arc::new(IdentityLimits::default());
        let s = Settings { max_connections: Some(2), rate: None };
        let a = limits.admit("a", s).unwrap();
        let _b = limits.admit("a", s).unwrap();
        assert_eq!(limits.admit("a", s).unwrap_err(), Refusal::Connections(2));
        assert!(limits.admit("other", s).is_ok(), "another identity is unaffected");
        drop(a);
        assert!(limits.admit("a", s).is_ok(), "a place comes back when a connection ends");

        let s = Settings { max_connections: None, rate: Some(Rate { per_second: 0.001, burst: 3.0 }) };
        let held: Vec<_> = (0..3).map(|_| limits.admit("r", s).unwrap()).collect();
        drop(held);
        assert_eq!(limits.admit("r", s).unwrap_err(), Refusal::Rate, "the burst is spent, ended or not");
        assert!(limits.admit("q", s).is_ok());
        assert!(limits.admit("x", Settings::default()).unwrap().is_none(), "no limits: nothing tracked");
    }
}
