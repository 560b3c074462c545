//! The caller's identity: a SPIFFE ID taken from the URI SAN of the client
//! certificate on the outer mTLS layer.
//!
//! Istio and cert-manager's csi-driver-spiffe issue IDs of the form
//! `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`; other SPIFFE
//! issuers (SPIRE) may use any path. Every valid SPIFFE ID is a principal; the
//! namespace and service account are known only for the Istio form.

use std::fmt;
use std::sync::Arc;

/// Longest SPIFFE ID accepted (the SPIFFE spec caps URIs at 2048 bytes).
const MAX_SPIFFE_ID_LEN: usize = 2048;

/// Istio's default trust domain: what `mtls.trust_domains` accepts when
/// the config names none, and the domain of the dev PKI's identities.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// A parsed SPIFFE ID. Cloning is cheap (one shared allocation): a
/// connection's identity travels with its destination through the stages.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Principal(Arc<Parts>);

#[derive(PartialEq, Eq, Hash)]
struct Parts {
    /// The whole ID as presented, `spiffe://…`.
    uri: Box<str>,
    /// Lower-case trust domain (the URI's authority).
    trust_domain: Box<str>,
    /// `ns/<namespace>` of the Istio form, if the path has that form.
    namespace: Option<Box<str>>,
    /// `sa/<service-account>` of the Istio form, if the path has that form.
    service_account: Option<Box<str>>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrincipalError {
    #[error("not a SPIFFE ID: it must start with spiffe://")]
    Scheme,
    #[error("the SPIFFE ID is longer than {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong,
    #[error("the SPIFFE ID has an invalid trust domain")]
    TrustDomain,
    #[error("the SPIFFE ID has an invalid path")]
    Path,
}

impl Principal {
    /// Parses a SPIFFE ID. The rules follow the SPIFFE ID spec: trust domain of
    /// lower-case letters, digits, '.', '-' and '_'; a path of non-empty
    /// segments of letters, digits, '.', '-' and '_', none of them '.' or '..';
    /// no query, fragment, port or user info.
    pub fn parse(uri: &str) -> Result<Self, PrincipalError> {
        if uri.len() > MAX_SPIFFE_ID_LEN {
            return Err(PrincipalError::TooLong);
        }
        let rest = uri
            .get(..9)
            .filter(|s| s.eq_ignore_ascii_case("spiffe://"))
            .map(|_| &uri[9..])
            .ok_or(PrincipalError::Scheme)?;
        let (domain, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let domain_ok = !domain.is_empty()
            && domain.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
        if !domain_ok {
            return Err(PrincipalError::TrustDomain);
        }
        let segments: Vec<&str> = if path.is_empty() { Vec::new() } else { path[1..].split('/').collect() };
        let segment_ok = |s: &&str| {
            !s.is_empty()
                && *s != "."
                && *s != ".."
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        };
        if !segments.iter().all(segment_ok) {
            return Err(PrincipalError::Path);
        }
        let (namespace, service_account) = match segments.as_slice() {
            ["ns", ns, "sa", sa] => (Some((*ns).into()), Some((*sa).into())),
            _ => (None, None),
        };
        Ok(Principal(Arc::new(Parts { uri: uri.into(), trust_domain: domain.into(), namespace, service_account })))
    }

    pub fn uri(&self) -> &str {
        &self.0.uri
    }

    pub fn trust_domain(&self) -> &str {
        &self.0.trust_domain
    }

    pub fn namespace(&self) -> Option<&str> {
        self.0.namespace.as_deref()
    }

    pub fn service_account(&self) -> Option<&str> {
        self.0.service_account.as_deref()
    }

    /// The ID without its scheme, as Istio's authorization policies and
    /// Mixer-era logs write it (`cluster.local/ns/default/sa/sleep`).
    pub fn without_scheme(&self) -> &str {
        self.0.uri.get(9..).unwrap_or_default()
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.uri())
    }
}

impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Principal({})", self.uri())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_istio_form() {
        let p = Principal::parse("spiffe://cluster.local/ns/default/sa/sleep").unwrap();
        assert_eq!(p.trust_domain(), "cluster.local");
        assert_eq!(p.namespace(), Some("default"));
        assert_eq!(p.service_account(), Some("sleep"));
        assert_eq!(p.without_scheme(), "cluster.local/ns/default/sa/sleep");
    }

    #[test]
    fn parses_other_forms_without_ns_sa() {
        let p = Principal::parse("spiffe://example.org/workload/billing").unwrap();
        assert_eq!(p.trust_domain(), "example.org");
        assert_eq!(p.namespace(), None);
        let p = Principal::parse("spiffe://example.org").unwrap();
        assert_eq!(p.service_account(), None);
    }

    #[test]
    fn refuses_invalid_ids() {
        for bad in [
            "https://cluster.local/ns/a/sa/b",
            "spiffe://",
            "spiffe:///ns/a/sa/b",
            "spiffe://Cluster.Local/ns/a/sa/b",
            "spiffe://cluster.local:8080/ns/a/sa/b",
            "spiffe://user@cluster.local/ns/a",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/a/sa/b/",
            "spiffe://cluster.local/ns/../sa/b",
            "spiffe://cluster.local/ns/a/sa/b?x=1",
            "spiffe://cluster.local/ns/a/sa/b#f",
            "spiffé://cluster.local/ns/a/sa/b",
        ] {
            assert!(Principal::parse(bad).is_err(), "{bad}");
        }
        let long = format!("spiffe://td/{}", "a".repeat(MAX_SPIFFE_ID_LEN));
        assert_eq!(Principal::parse(&long), Err(PrincipalError::TooLong));
    }
}
