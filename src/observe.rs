//! What a running gateway tells its operators: one access record per
//! connection ([`access_log`]), Prometheus metrics ([`metrics`]) served with
//! the health endpoints ([`admin`]), and diagnostics on stderr that never
//! block a connection ([`stderr`]).

pub mod access_log;
pub mod admin;
pub mod metrics;
pub mod stderr;
