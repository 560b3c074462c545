//! What a front hands to the rest of the pipeline: where the client wants
//! to go, and who is asking.
//!
//! Every front produces one (the TLS front from the ClientHello's SNI and
//! the listener's `upstream_port`); policy, resolve and connect work from it
//! alone, so a new front or a new arrival adds no branch after this point.

use crate::identity::Principal;
use crate::name::ServerName;

/// A validated destination and the caller it is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// The validated, normalised host name; never an IP literal.
    pub name: ServerName,
    /// The port to dial; never taken from the SNI.
    pub port: u16,
    /// The caller's identity, when the arrival established one (outer mTLS,
    /// or a trusted PROXY header's identity TLV).
    pub identity: Option<Principal>,
    /// Where the client connected to, when the arrival knows: a PROXY
    /// header's destination, an intercepted connection's original one.
    pub original: Option<std::net::SocketAddr>,
    /// The name must resolve to `original`, the only address dialled
    /// directly (`verify_destination: strict`; a CONNECT to an address).
    pub strict: bool,
}
