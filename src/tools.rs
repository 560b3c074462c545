//! Commands beside the gateway: `snigress check` ([`check`]), the
//! development PKI ([`devcerts`]), `snigress sidecar` ([`sidecar`]) and
//! `snigress iptables` ([`iptables`]).

pub mod check;
pub mod devcerts;
pub mod iptables;
pub mod rollout;
pub mod sidecar;
