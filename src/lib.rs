//! snigress: an SNI-routing egress gateway for service meshes.
//!
//! ```text
//! sidecar --mTLS(outer)--> snigress --TCP--> real target
//!            [ inner TLS: application <-> target, never decrypted here ]
//!
//! accept                      listener.rs   connection limit, accept loop
//!  -> outer mTLS              mtls.rs       client cert from the mesh CA, SPIFFE ID
//!  -> inner ClientHello       sni.rs        reassembled across records and reads
//!  -> name                    name.rs       validated, normalised host name
//!  -> policy                  policy.rs     allow/deny patterns, per-identity rules
//!  -> resolve + vet           resolve.rs    DNS (absolute names), SSRF guard
//!  -> connect                 connect.rs    each vetted address in turn
//!  -> replay + splice         splice.rs     buffered bytes first, then both ways
//!                             zerocopy.rs   splice(2) through a pipe when both sides are TCP
//!  -> one access record       access_log.rs JSON line per connection
//!     + counters               metrics.rs    per SNI and caller, bytes live
//! ```
//!
//! `conn.rs` calls the stages in this order for one connection and produces
//! its record; passthrough listeners skip the outer layer.
//!
//! # Layout
//! - [`cli`], [`config`]: arguments; YAML schema and validation.
//! - [`listener`]: binding, accept loop, connection limit; [`conn`]: one connection.
//! - [`mtls`], [`identity`]: the outer layer and the caller's SPIFFE ID.
//! - [`sni`], [`name`]: the inner ClientHello and its server name.
//! - [`policy`]: compiled patterns and `decide`.
//! - [`resolve`], [`connect`], [`splice`]: the way to the target.
//! - [`access_log`]: the per-connection record and its writer.
//! - [`metrics`], [`admin`]: Prometheus metrics; /metrics, /healthz, /readyz.
//! - [`devcerts`]: the development PKI; [`sidecar`]: the client half of the mesh.
//! - [`reload`]: live reload of the config and certificates.

#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod check;
pub mod cli;
pub mod config;
pub mod conn;
pub mod connect;
pub mod devcerts;
pub mod identity;
pub mod listener;
pub mod metrics;
pub mod mtls;
pub mod name;
pub mod policy;
pub mod reload;
pub mod resolve;
pub mod sidecar;
pub mod sni;
pub mod splice;
pub mod zerocopy;
