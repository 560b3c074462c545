//! Arrival: how a client's bytes reach the gateway, before any front reads
//! them. Plain TCP needs no stage; [`mtls`] terminates the mesh's outer
//! mTLS layer and establishes the caller's identity.
//!
//! Whatever the arrival, the front and the relay see one [`ClientStream`].

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

pub mod mtls;

/// A client's stream after its arrival stage.
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send {
    /// The plain TCP socket, when no layer sits between the client and the
    /// gateway: then bytes can move with `splice(2)`.
    fn plain_tcp(&self) -> Option<&TcpStream>;
}

impl ClientStream for TcpStream {
    fn plain_tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
}
