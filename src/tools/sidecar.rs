//! `snigress sidecar`: the client half of the mesh, for callers without one.
//!
//! Accepts plain TCP connections that carry the application's own TLS and
//! wraps each in the outer mTLS layer to a gateway, as an Istio sidecar does
//! under ISTIO_MUTUAL: the caller's SPIFFE certificate, the mesh roots, the
//! same ALPN offer (`istio-peer-exchange`, `istio`). The application's bytes
//! are carried untouched; its TLS is end to end with the destination.
//!
//! The gateway is verified either by host name (its certificate's DNS or IP
//! SAN matches `server_name`, as with the dev PKI) or, like Istio does, by
//! its SPIFFE ID (`gateway_id`), whatever name it was reached by.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

use crate::arrive::mtls::{load_certs, load_key, provider, spiffe_id};
use crate::identity::Principal;
use crate::relay::{IdleTimeouts, Transfer, copy::copy};

/// ALPN an Istio sidecar offers for a TCP/TLS destination port.
pub const ISTIO_ALPN: [&str; 2] = ["istio-peer-exchange", "istio"];

#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    /// `host:port` of the gateway's mtls listener.
    pub gateway: String,
    /// Sent as the outer SNI and, without `gateway_id`, checked against the
    /// gateway certificate.
    pub server_name: String,
    /// Verify the gateway by this SPIFFE ID instead of by name.
    pub gateway_id: Option<Principal>,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub alpn: Vec<String>,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    #[error("{0}: {1}")]
    File(PathBuf, String),
    #[error("invalid --server-name {0:?}")]
    ServerName(String),
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error("TLS setup failed: {0}")]
    Tls(String),
}

pub struct Sidecar {
    listener: TcpListener,
    connector: TlsConnector,
    server_name: ServerName<'static>,
    settings: Settings,
}

impl Sidecar {
    pub async fn bind(settings: Settings) -> Result<Sidecar, SidecarError> {
        let file_err = |path: &PathBuf| {
            let path = path.clone();
            move |why: String| SidecarError::File(path, why)
        };
        let certs = load_certs(&settings.cert).map_err(file_err(&settings.cert))?;
        let key = load_key(&settings.key).map_err(file_err(&settings.key))?;
        let mut roots = RootCertStore::empty();
        for cert in load_certs(&settings.ca).map_err(file_err(&settings.ca))? {
            roots.add(cert).map_err(|e| SidecarError::File(settings.ca.clone(), e.to_string()))?;
        }
        let roots = Arc::new(roots);
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| SidecarError::Tls(e.to_string()))?;
        let builder = match &settings.gateway_id {
            None => builder.with_root_certificates(roots),
            Some(id) => builder.dangerous().with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
                roots,
                id: id.clone(),
                provider: provider(),
            })),
        };
        let mut config = builder
            .with_client_auth_cert(certs, key)
            .map_err(|e| SidecarError::File(settings.key.clone(), format!("does not fit the certificate: {e}")))?;
        config.alpn_protocols = settings.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let server_name = ServerName::try_from(settings.server_name.clone())
            .map_err(|_| SidecarError::ServerName(settings.server_name.clone()))?;
        let listener = TcpListener::bind(settings.listen).await.map_err(|e| SidecarError::Bind(settings.listen, e))?;
        Ok(Sidecar { listener, connector: TlsConnector::from(Arc::new(config)), server_name, settings })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until the task is dropped.
    pub async fn serve(self) {
        let shared = Arc::new(self);
        let mut backoff = crate::net::Backoff::default();
        loop {
            let (app, peer) = crate::net::accept(&shared.listener, &mut backoff, |e, _| {
                tracing::warn!(error = %e, "sidecar: accept failed");
            })
            .await;
            let shared = shared.clone();
            tokio::spawn(async move {
                match shared.carry(app).await {
                    Ok((transfer, how)) => tracing::info!(
                        client = %peer, from_client = transfer.bytes_from_client(), to_client = transfer.bytes_to_client(),
                        termination = how, "sidecar: connection ended"),
                    Err(e) => tracing::warn!(client = %peer, gateway = %shared.settings.gateway, error = %e,
                        "sidecar: cannot reach the gateway"),
                }
            });
        }
    }

    async fn carry(&self, mut app: TcpStream) -> std::io::Result<(Transfer, &'static str)> {
        crate::net::tune(&app);
        let s = &self.settings;
        let outer = tokio::time::timeout(s.connect_timeout, async {
            let tcp = TcpStream::connect(&s.gateway).await?;
            crate::net::tune(&tcp);
            self.connector.connect(self.server_name.clone(), tcp).await
        })
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connecting to the gateway timed out"))??;
        let mut outer = outer;
        let transfer = Transfer::default();
        let idle = IdleTimeouts { open: s.idle_timeout, half_closed: s.idle_timeout };
        let how = copy(&mut app, &mut outer, Vec::new(), idle, &transfer).await;
        Ok((transfer, how.as_str()))
    }
}

/// Verifies the gateway's chain against the mesh roots and its identity by
/// SPIFFE ID, ignoring the name it was reached by (what Istio does with a
/// DestinationRule's subjectAltNames).
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    id: Principal,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        let algorithms = self.provider.signature_verification_algorithms.all;
        rustls::client::verify_server_cert_signed_by_trust_anchor(&cert, &self.roots, intermediates, now, algorithms)?;
        match spiffe_id(end_entity) {
            Ok(found) if found == self.id => Ok(ServerCertVerified::assertion()),
            _ => Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
