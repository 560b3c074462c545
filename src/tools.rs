//! Commands beside the gateway: `snigress check` ([`check`]), the
//! development PKI ([`devcerts`]) and `snigress sidecar` ([`sidecar`]).

pub mod check;
pub mod devcerts;
pub mod sidecar;
