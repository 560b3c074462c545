//! snigress: an SNI-routing egress gateway for service meshes.
//!
//! ```text
//! sidecar --mTLS(outer)--> snigress --TCP--> real target
//! (or: ztunnel --PROXY v2--> snigress; iptables REDIRECT/TPROXY --> snigress)
//!            [ inner TLS: application <-> target, never decrypted here ]
//!
//! accept              gateway/accept.rs  connection limits, accept loop, drain
//!  -> arrival         arrive/            how the bytes came: plain TCP | PROXY header (proxy.rs)
//!                                        | original destination (transparent.rs) | outer mTLS
//!  -> front           front/tls.rs       how the destination is learned: the ClientHello's SNI
//!  -> Destination     destination.rs     validated name (name.rs), port, caller (identity.rs)
//!  -> policy          policy.rs          allow/deny patterns, per-identity rules
//!  -> resolve + vet   resolve.rs         DNS (absolute names), SSRF guard (resolve/vet.rs)
//!  -> connect         connect.rs         the vetted addresses in turn, under a total budget
//!  -> replay + relay  relay/             buffered bytes first, then both ways (copy.rs),
//!                                        or splice(2) when both sides are TCP (splice.rs)
//!  -> one record      observe/           access_log.rs, metrics.rs; admin.rs serves them
//! ```
//!
//! [`conn`] runs these stages in this order for one connection; every way a
//! connection can end is one [`error::ConnError`], and every connection
//! leaves exactly one access record. Stage modules do not import each other;
//! they share only the newtypes in [`name`], [`identity`] and
//! [`destination`].
//!
//! # Layout
//! - [`cli`], [`config`]: arguments; the YAML schema, its validation, its errors.
//! - [`gateway`]: binding, the accept loop, limits and drain; live reload;
//!   `admission.rs`: the budget of connections without a destination yet.
//! - [`state`]: what a connection runs on (one snapshot per config).
//! - [`conn`]: one connection, start to end; [`error`]: how it can end.
//! - [`arrive`]: the outer mTLS layer; [`front`]: the inner ClientHello.
//! - [`name`], [`identity`], [`destination`]: the shared newtypes.
//! - [`policy`], [`resolve`], [`connect`], [`relay`]: the way to the target.
//! - [`observe`]: the access record, metrics, the admin endpoint, the stderr writer.
//! - [`tools`]: `snigress check`, the development PKI, `snigress sidecar`.

#![forbid(unsafe_code)]

mod admission;
pub mod arrive;
pub mod cli;
pub mod config;
mod conn;
mod connect;
mod destination;
pub mod error;
pub mod front;
pub mod gateway;
pub mod identity;
pub mod identity_limits;
pub mod name;
mod net;
pub mod observe;
pub mod policy;
pub mod relay;
pub mod resolve;
pub mod route;
pub mod state;
pub mod tools;
