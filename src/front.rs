//! Fronts: how the gateway learns where a client wants to go, from the
//! first bytes it sends. Today one: [`tls`], the server_name of the
//! ClientHello. Every byte a front reads is kept, to be replayed upstream.

pub mod tls;
