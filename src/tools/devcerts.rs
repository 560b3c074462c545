//! A development mesh PKI minted with rcgen: a CA, a gateway certificate and
//! client certificates carrying SPIFFE URI SANs, as Istio's CA would issue.
//!
//! For trying snigress locally and for tests only: keys are written in the
//! clear next to the certificates.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

pub use crate::arrive::mtls::dev_pki::{CA_CERT, CA_KEY, GATEWAY_CERT, GATEWAY_KEY};
use crate::identity::{DEFAULT_TRUST_DOMAIN, Principal};

/// What to put in a dev PKI.
#[derive(Debug, Clone)]
pub struct Spec {
    /// The gateway's own SPIFFE ID (what a DestinationRule's subjectAltNames
    /// would name).
    pub gateway_id: Principal,
    /// DNS names and IP addresses for the gateway certificate.
    pub server_names: Vec<String>,
    pub clients: Vec<Principal>,
}

impl Spec {
    /// The PKI `dev_pki` mints: one client, `default/sleep` as in Istio's samples.
    pub fn local() -> Spec {
        let p = |s: &str| Principal::parse(s).unwrap_or_else(|e| unreachable!("built-in SPIFFE ID {s}: {e}"));
        Spec {
            gateway_id: p("spiffe://cluster.local/ns/snigress/sa/snigress"),
            server_names: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            clients: vec![p("spiffe://cluster.local/ns/default/sa/sleep")],
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DevCertError {
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{0} exists; remove it or pass --force to overwrite")]
    Exists(PathBuf),
    #[error("{0} holds only part of a dev PKI (missing {1}); empty the directory to mint a new one")]
    Partial(PathBuf, String),
}

/// File names of a client's certificate and key: `client-<ns>-<sa>.pem`
/// for Istio-form IDs in `cluster.local`, the whole ID without its scheme,
/// '/' as '-', otherwise (so two trust domains never share a file).
pub fn client_files(p: &Principal) -> (String, String) {
    let stem = match (p.namespace(), p.service_account()) {
        (Some(ns), Some(sa)) if p.trust_domain() == DEFAULT_TRUST_DOMAIN => {
            format!("client-{ns}-{sa}")
        }
        _ => format!("client-{}", p.without_scheme().replace('/', "-")),
    };
    (format!("{stem}.pem"), format!("{stem}.key"))
}

/// Mints the PKI into `dir` (created if needed). Refuses to overwrite
/// existing files unless `force`. Returns the files written.
pub fn mint(dir: &Path, spec: &Spec, force: bool) -> Result<Vec<PathBuf>, DevCertError> {
    let mut files: Vec<(String, String)> = Vec::new();

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    ca.distinguished_name.push(DnType::OrganizationName, "snigress development");
    ca.distinguished_name.push(DnType::CommonName, "snigress development mesh CA");
    let now = OffsetDateTime::now_utc();
    ca.not_before = now - Duration::hours(1);
    ca.not_after = now + Duration::days(3650);
    let ca_cert = ca.self_signed(&ca_key)?;
    files.push((CA_CERT.into(), ca_cert.pem()));
    files.push((CA_KEY.into(), ca_key.serialize_pem()));
    let issuer = Issuer::new(ca, ca_key);

    let leaf =
        |id: &Principal, names: &[String], usage: ExtendedKeyUsagePurpose| -> Result<(String, String), DevCertError> {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params.distinguished_name.push(DnType::OrganizationName, "snigress development");
            params.distinguished_name.push(DnType::CommonName, id.uri());
            params.subject_alt_names.push(SanType::URI(id.uri().try_into()?));
            for name in names {
                params.subject_alt_names.push(match name.parse::<IpAddr>() {
                    Ok(ip) => SanType::IpAddress(ip),
                    Err(_) => SanType::DnsName(name.as_str().try_into()?),
                });
            }
            params.extended_key_usages = vec![usage];
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.not_before = now - Duration::hours(1);
            params.not_after = now + Duration::days(365);
            let cert = params.signed_by(&key, &issuer)?;
            Ok((cert.pem(), key.serialize_pem()))
        };

    let (cert, key) = leaf(&spec.gateway_id, &spec.server_names, ExtendedKeyUsagePurpose::ServerAuth)?;
    files.push((GATEWAY_CERT.into(), cert));
    files.push((GATEWAY_KEY.into(), key));
    for client in &spec.clients {
        let (cert_name, key_name) = client_files(client);
        if files.iter().any(|(name, _)| *name == cert_name) {
            continue; // the same ID given twice
        }
        let (cert, key) = leaf(client, &[], ExtendedKeyUsagePurpose::ClientAuth)?;
        files.push((cert_name, cert));
        files.push((key_name, key));
    }

    fs::create_dir_all(dir).map_err(|e| DevCertError::Io(dir.to_owned(), e))?;
    if !force && let Some((name, _)) = files.iter().find(|(name, _)| dir.join(name).exists()) {
        return Err(DevCertError::Exists(dir.join(name)));
    }
    let mut written = Vec::new();
    for (name, content) in files {
        let path = dir.join(&name);
        let mode = if name.ends_with(".key") { 0o600 } else { 0o644 };
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .map_err(|e| DevCertError::Io(path.clone(), e))?;
        f.write_all(content.as_bytes()).map_err(|e| DevCertError::Io(path.clone(), e))?;
        written.push(path);
    }
    Ok(written)
}

/// For `dev_pki: DIR`: mints the local PKI when `dir` is missing or empty and
/// returns `true`; returns `false` when a complete PKI is already there.
pub fn ensure(dir: &Path) -> Result<bool, DevCertError> {
    let empty = match fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => return Err(DevCertError::Io(dir.to_owned(), e)),
    };
    if empty {
        mint(dir, &Spec::local(), false)?;
        return Ok(true);
    }
    let missing: Vec<&str> =
        [CA_CERT, GATEWAY_CERT, GATEWAY_KEY].into_iter().filter(|f| !dir.join(f).exists()).collect();
    if !missing.is_empty() {
        return Err(DevCertError::Partial(dir.to_owned(), missing.join(", ")));
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mints_ensures_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("pki");
        assert!(ensure(&pki).unwrap());
        assert!(!ensure(&pki).unwrap());
        for f in [CA_CERT, CA_KEY, GATEWAY_CERT, GATEWAY_KEY, "client-default-sleep.pem", "client-default-sleep.key"] {
            assert!(pki.join(f).exists(), "{f}");
        }
        let mode = fs::metadata(pki.join(GATEWAY_KEY)).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
        assert!(matches!(mint(&pki, &Spec::local(), false), Err(DevCertError::Exists(_))));
        assert!(mint(&pki, &Spec::local(), true).is_ok());
        fs::remove_file(pki.join(GATEWAY_KEY)).unwrap();
        assert!(matches!(ensure(&pki), Err(DevCertError::Partial(..))));
    }

    #[test]
    fn client_certificates_carry_the_spiffe_id() {
        let dir = tempfile::tempdir().unwrap();
        let spire = Principal::parse("spiffe://example.org/workload/a").unwrap();
        let mut spec = Spec::local();
        spec.clients.push(spire.clone());
        mint(dir.path(), &spec, false).unwrap();
        let (cert, _) = client_files(&spire);
        assert_eq!(cert, "client-example.org-workload-a.pem");
        let pem = fs::read(dir.path().join(cert)).unwrap();
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(&pem).unwrap();
        let der: rustls::pki_types::CertificateDer = der;
        assert_eq!(crate::arrive::mtls::spiffe_id(&der).unwrap(), spire);
    }
}
