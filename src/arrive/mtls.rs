//! The outer mesh mTLS layer: certificate material, the rustls server config,
//! client verification (chain to the mesh roots, then a SPIFFE ID in an
//! accepted trust domain) and the handshake with its timeout.
//!
//! TLS 1.2 and 1.3 by default (`mtls.min_version: "1.3"` for strict meshes),
//! the AEAD suites of the aws-lc-rs provider only, client certificates
//! always required.
//!
//! The outer SNI is recorded for the log and never used for routing: Istio
//! sets it to `outbound_.<port>_.<subset>_.<host>`, not the application's
//! name. The server never negotiates ALPN `istio-peer-exchange` (an Envoy
//! client would then write a metadata preamble into the stream); the config
//! refuses that value and the default offers no ALPN at all.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::arrive::ClientStream;
use crate::identity::Principal;

/// The crypto provider for every TLS config in the process: aws-lc-rs, with
/// X25519MLKEM768 preferred (see DEPS.md). Passed explicitly so that no
/// process-wide default is needed.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// File names of a development PKI directory (`mtls.dev_pki`, `snigress
/// certs`): the mesh CA and the gateway's own certificate.
pub mod dev_pki {
    pub const CA_CERT: &str = "ca.pem";
    pub const CA_KEY: &str = "ca.key";
    pub const GATEWAY_CERT: &str = "gateway.pem";
    pub const GATEWAY_KEY: &str = "gateway.key";
}

/// Where the outer layer's certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaterialPaths {
    /// Gateway certificate chain (leaf first), PEM.
    pub cert: PathBuf,
    /// Gateway private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Mesh root certificates that client chains must lead to, PEM; several
    /// roots are normal during a root rotation.
    pub client_ca: PathBuf,
}

impl MaterialPaths {
    /// The files a development PKI directory gives the outer layer.
    pub fn dev_pki(dir: &Path) -> MaterialPaths {
        MaterialPaths {
            cert: dir.join(dev_pki::GATEWAY_CERT),
            key: dir.join(dev_pki::GATEWAY_KEY),
            client_ca: dir.join(dev_pki::CA_CERT),
        }
    }

    /// The three files, for watching and fingerprinting.
    pub fn files(&self) -> [&Path; 3] {
        [&self.cert, &self.key, &self.client_ca]
    }
}

/// Which file of the material failed, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaterialError {
    #[error("mtls.cert {0}: {1}")]
    Cert(PathBuf, String),
    #[error("mtls.key {0}: {1}")]
    Key(PathBuf, String),
    #[error("mtls.client_ca {0}: {1}")]
    ClientCa(PathBuf, String),
}

impl MaterialError {
    /// The config key the error is about.
    pub fn key(&self) -> &'static str {
        match self {
            MaterialError::Cert(..) => "cert",
            MaterialError::Key(..) => "key",
            MaterialError::ClientCa(..) => "client_ca",
        }
    }
}

/// The lowest TLS version the outer layer accepts (`mtls.min_version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MinVersion {
    /// TLS 1.2 and 1.3: Istio's default (`meshMTLS.minProtocolVersion`).
    #[default]
    Tls12,
    /// TLS 1.3 only, for meshes that set `minProtocolVersion: TLSV1_3`.
    Tls13,
}

/// Outer-layer settings from the config.
#[derive(Debug, Clone)]
pub struct OuterSettings {
    pub paths: MaterialPaths,
    /// Accepted SPIFFE trust domains (lower case).
    pub trust_domains: Vec<String>,
    /// ALPN protocols the server may select; never `istio-peer-exchange`.
    pub alpn: Vec<String>,
    pub min_version: MinVersion,
    pub handshake_timeout: Duration,
}

/// Every CERTIFICATE block of a PEM file; an error when there is none.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&pem).collect::<Result<_, _>>().map_err(|e| format!("invalid PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block found".into());
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| format!("no usable private key: {e}"))
}

/// Reads and checks the material, and builds the rustls server config;
/// also returns the expiry of the gateway's certificate (Unix seconds).
pub fn server_config(settings: &OuterSettings) -> Result<(Arc<ServerConfig>, Option<i64>), MaterialError> {
    let paths = &settings.paths;
    let cert_err = |why: String| MaterialError::Cert(paths.cert.clone(), why);
    let key_err = |why: String| MaterialError::Key(paths.key.clone(), why);
    let ca_err = |why: String| MaterialError::ClientCa(paths.client_ca.clone(), why);

    let chain = load_certs(&paths.cert).map_err(cert_err)?;
    let not_after = chain
        .first()
        .and_then(|leaf| X509Certificate::from_der(leaf).ok())
        .map(|(_, c)| c.validity().not_after.timestamp());
    let key = load_key(&paths.key).map_err(key_err)?;
    let mut roots = RootCertStore::empty();
    for cert in load_certs(&paths.client_ca).map_err(ca_err)? {
        roots.add(cert).map_err(|e| ca_err(format!("unusable root certificate: {e}")))?;
    }

    let provider = provider();
    let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| ca_err(format!("cannot build the client verifier: {e}")))?;
    let verifier = Arc::new(SpiffeVerifier { inner: webpki, trust_domains: settings.trust_domains.clone() });
    let versions: &[&rustls::SupportedProtocolVersion] = match settings.min_version {
        MinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        MinVersion::Tls13 => &[&rustls::version::TLS13],
    };
    // Session resumption stays rustls's default: stateful, an in-memory
    // cache of 256 sessions per config (so every reload and certificate
    // rotation starts a new one), no tickets; a resumed session carries the
    // identity verified at its full handshake.
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| cert_err(format!("TLS setup failed: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| key_err(format!("does not fit the certificate: {e}")))?;
    config.alpn_protocols = settings.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok((Arc::new(config), not_after))
}

/// Why a client certificate's identity was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("no client certificate")]
    Missing,
    #[error("unreadable client certificate")]
    Unparsable,
    #[error("the client certificate has no SPIFFE ID (URI SAN)")]
    NoSpiffeId,
    #[error("the client certificate has more than one SPIFFE ID")]
    SeveralSpiffeIds,
    #[error("the client certificate's SPIFFE ID {0:?} is invalid")]
    Invalid(String),
    #[error("trust domain {0:?} is not accepted (mtls.trust_domains)")]
    TrustDomain(String),
}

/// The SPIFFE ID in a certificate's URI SANs (exactly one is allowed).
pub fn spiffe_id(der: &[u8]) -> Result<Principal, IdentityError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| IdentityError::Unparsable)?;
    let san = cert.subject_alternative_name().map_err(|_| IdentityError::Unparsable)?;
    let mut uris = san.iter().flat_map(|ext| ext.value.general_names.iter()).filter_map(|name| match name {
        GeneralName::URI(uri) if uri.get(..9).is_some_and(|p| p.eq_ignore_ascii_case("spiffe://")) => Some(*uri),
        _ => None,
    });
    let uri = uris.next().ok_or(IdentityError::NoSpiffeId)?;
    if uris.next().is_some() {
        return Err(IdentityError::SeveralSpiffeIds);
    }
    Principal::parse(uri).map_err(|_| IdentityError::Invalid(uri.to_owned()))
}

/// The webpki verifier, then the SPIFFE identity check, so that a caller
/// outside the accepted trust domains fails the handshake itself.
#[derive(Debug)]
struct SpiffeVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domains: Vec<String>,
}

impl SpiffeVerifier {
    fn check(&self, der: &[u8]) -> Result<Principal, IdentityError> {
        let principal = spiffe_id(der)?;
        if !self.trust_domains.iter().any(|td| td == principal.trust_domain()) {
            return Err(IdentityError::TrustDomain(principal.trust_domain().to_owned()));
        }
        Ok(principal)
    }
}

impl ClientCertVerifier for SpiffeVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner.verify_client_cert(end_entity, intermediates, now)?;
        self.check(end_entity)
            .map_err(|e| rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e)))))?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// What the outer handshake established about the caller.
#[derive(Debug, Clone)]
pub struct Peer {
    pub principal: Principal,
    /// The SNI of the outer layer (for the log only).
    pub outer_sni: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("outer TLS handshake timed out")]
    Timeout,
    #[error("client identity refused: {0}")]
    Identity(#[from] IdentityError),
    #[error("outer TLS handshake failed: {0}")]
    Failed(#[source] io::Error),
}

impl HandshakeError {
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeError::Timeout => "outer_handshake_timeout",
            HandshakeError::Identity(_) => "identity_refused",
            HandshakeError::Failed(_) => "outer_handshake_failed",
        }
    }
}

/// The outer mesh mTLS layer of every mtls listener: built once per config.
#[derive(Clone)]
pub struct MeshTls {
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
    /// Expiry of the gateway's certificate, Unix seconds.
    pub not_after: Option<i64>,
}

impl fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshTls").field("handshake_timeout", &self.handshake_timeout).finish_non_exhaustive()
    }
}

impl MeshTls {
    pub fn new(settings: &OuterSettings) -> Result<MeshTls, MaterialError> {
        let (config, not_after) = server_config(settings)?;
        Ok(MeshTls { acceptor: TlsAcceptor::from(config), handshake_timeout: settings.handshake_timeout, not_after })
    }

    /// Runs the outer handshake under its timeout.
    pub async fn accept(&self, tcp: TcpStream) -> Result<(MeshStream, Peer), HandshakeError> {
        let stream = tokio::time::timeout(self.handshake_timeout, self.acceptor.accept(tcp))
            .await
            .map_err(|_| HandshakeError::Timeout)?
            .map_err(classify)?;
        let (_, conn) = stream.get_ref();
        // The verifier already checked the identity; this reads it again for
        // the connection (rustls keeps only the DER).
        let leaf = conn.peer_certificates().and_then(|chain| chain.first()).ok_or(IdentityError::Missing)?;
        let peer = Peer { principal: spiffe_id(leaf)?, outer_sni: conn.server_name().map(str::to_owned) };
        Ok((MeshStream(Box::new(stream)), peer))
    }
}

/// The decrypted stream inside the outer layer: what the front reads.
/// (Boxed: the rustls connection is over a kilobyte, and the stages that
/// hold the stream by value, and the futures that move it between them,
/// then each hold a pointer instead of their own room for it.)
pub struct MeshStream(Box<TlsStream<TcpStream>>);

impl AsyncRead for MeshStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for MeshStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

impl ClientStream for MeshStream {
    fn plain_tcp(&self) -> Option<&TcpStream> {
        None
    }
}

fn classify(e: io::Error) -> HandshakeError {
    let tls = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>());
    if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(other))) = tls
        && let Some(identity) = other.0.downcast_ref::<IdentityError>()
    {
        return HandshakeError::Identity(identity.clone());
    }
    HandshakeError::Failed(e)
}
