//! The validated host name: the only form in which a name from the wire (the
//! inner SNI) or from the command line ever reaches policy, DNS or logs.
//!
//! Normalisation happens once, here: ASCII lower case, one trailing dot
//! removed. Validation is strict LDH (RFC 952/1123 as used by RFC 6066):
//! labels of 1–63 letters, digits and hyphens, not starting or ending with a
//! hyphen, at most 253 bytes in all, and never an IP literal. A-labels
//! (`xn--…`) are ordinary LDH labels and pass; U-labels (raw UTF-8) do not.

use std::fmt;

/// Longest name in presentation form without the trailing dot (RFC 1035 §2.3.4
/// allows 255 octets on the wire, which is 253 characters of text).
pub const MAX_NAME_LEN: usize = 253;
/// Longest label (RFC 1035 §2.3.4).
pub const MAX_LABEL_LEN: usize = 63;

/// A host name that passed validation; lower case, no trailing dot.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerName(Box<str>);

/// Why a name was refused. Kept small: the log carries only the fact that the
/// name was invalid, the diagnostic log carries this detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("the name is empty")]
    Empty,
    #[error("the name is longer than {MAX_NAME_LEN} bytes")]
    TooLong,
    #[error("the name has an empty label")]
    EmptyLabel,
    #[error("a label is longer than {MAX_LABEL_LEN} bytes")]
    LabelTooLong,
    #[error("the name has a character outside letters, digits, '-' and '.'")]
    BadCharacter,
    #[error("a label starts or ends with '-'")]
    BadHyphen,
    #[error("the name is an IP address literal")]
    IpLiteral,
}

impl ServerName {
    /// Validates and normalises raw bytes (as carried in the SNI extension).
    pub fn from_bytes(raw: &[u8]) -> Result<Self, NameError> {
        let raw = raw.strip_suffix(b".").unwrap_or(raw);
        if raw.is_empty() {
            return Err(NameError::Empty);
        }
        if raw.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        let mut all_numeric_last_label = false;
        for label in raw.split(|&b| b == b'.') {
            if label.is_empty() {
                return Err(NameError::EmptyLabel);
            }
            if label.len() > MAX_LABEL_LEN {
                return Err(NameError::LabelTooLong);
            }
            if !label.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-') {
                return Err(NameError::BadCharacter);
            }
            if label.first() == Some(&b'-') || label.last() == Some(&b'-') {
                return Err(NameError::BadHyphen);
            }
            all_numeric_last_label = label.iter().all(u8::is_ascii_digit);
        }
        // A name whose last label is all digits is an IPv4 literal in one of its
        // forms (`127.0.0.1`, `10.1`, `0x7f.1`) or would be read as one by some
        // resolver; no real top-level domain is numeric. IPv6 literals never get
        // here: ':' and '[' are refused as characters.
        if all_numeric_last_label {
            return Err(NameError::IpLiteral);
        }
        // Bytes are ASCII here, so this cannot fail; lower-casing is the
        // normalisation every comparison relies on.
        let text: String = raw.iter().map(|b| b.to_ascii_lowercase() as char).collect();
        Ok(ServerName(text.into_boxed_str()))
    }

    /// Validates and normalises a name typed by a person (config, CLI).
    pub fn parse(text: &str) -> Result<Self, NameError> {
        Self::from_bytes(text.as_bytes())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Labels from the right (top-level label first), as the policy trie walks them.
    pub fn labels_rev(&self) -> impl Iterator<Item = &str> {
        self.0.rsplit('.')
    }

    /// The name in absolute form (with the root dot), so that DNS never applies
    /// a search path: `redis` must not become `redis.default.svc.cluster.local`.
    pub fn to_absolute(&self) -> String {
        format!("{}.", self.0)
    }
}

impl fmt::Display for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerName({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_normalises() {
        let cases = [
            ("example.com", "example.com"),
            ("EXAMPLE.Com", "example.com"),
            ("example.com.", "example.com"),
            ("a.b.c.example.com", "a.b.c.example.com"),
            ("xn--bcher-kva.example", "xn--bcher-kva.example"),
            ("XN--BCHER-KVA.EXAMPLE.", "xn--bcher-kva.example"),
            ("localhost", "localhost"),
            ("a-b.c-d.example", "a-b.c-d.example"),
            ("1.example.com", "1.example.com"),
            ("123.com", "123.com"),
            ("a", "a"),
        ];
        for (input, want) in cases {
            let got = ServerName::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(got.as_str(), want, "{input}");
        }
    }

    #[test]
    fn refuses_bad_names() {
        let label64 = "a".repeat(64);
        let long_name = vec!["a".repeat(63); 5].join("."); // 319 bytes
        let cases: Vec<(String, NameError)> = vec![
            ("".into(), NameError::Empty),
            (".".into(), NameError::Empty),
            ("example.com..".into(), NameError::EmptyLabel),
            (".example.com".into(), NameError::EmptyLabel),
            ("a..b".into(), NameError::EmptyLabel),
            (format!("{label64}.com"), NameError::LabelTooLong),
            (long_name, NameError::TooLong),
            ("exa mple.com".into(), NameError::BadCharacter),
            ("exam_ple.com".into(), NameError::BadCharacter),
            ("*.example.com".into(), NameError::BadCharacter),
            ("example.com:443".into(), NameError::BadCharacter),
            ("[::1]".into(), NameError::BadCharacter),
            ("::1".into(), NameError::BadCharacter),
            ("ex\0ample.com".into(), NameError::BadCharacter),
            ("bücher.example".into(), NameError::BadCharacter),
            ("-a.example.com".into(), NameError::BadHyphen),
            ("a-.example.com".into(), NameError::BadHyphen),
            ("127.0.0.1".into(), NameError::IpLiteral),
            ("169.254.169.254.".into(), NameError::IpLiteral),
            ("10.1".into(), NameError::IpLiteral),
            ("4294967295".into(), NameError::IpLiteral),
        ];
        for (input, want) in cases {
            assert_eq!(ServerName::parse(&input), Err(want), "{input:?}");
        }
    }

    #[test]
    fn exact_length_bounds() {
        let label63 = "a".repeat(63);
        assert!(ServerName::parse(&format!("{label63}.com")).is_ok());
        // 63*3 + 61 + 3 dots = 253
        let name253 = format!("{0}.{0}.{0}.{1}", label63, "b".repeat(61));
        assert_eq!(name253.len(), 253);
        assert!(ServerName::parse(&name253).is_ok());
        assert!(ServerName::parse(&format!("{name253}.")).is_ok());
        assert_eq!(ServerName::parse(&format!("{name253}b")), Err(NameError::TooLong));
    }

    #[test]
    fn labels_from_the_right() {
        let n = ServerName::parse("a.b.example.com").unwrap();
        assert_eq!(n.labels_rev().collect::<Vec<_>>(), ["com", "example", "b", "a"]);
        assert_eq!(n.to_absolute(), "a.b.example.com.");
    }
}
