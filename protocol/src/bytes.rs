//! Binary payloads inside operations.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bytes that travel as such on the wire but show as their SHA-256 and length in
/// human-readable forms (a plan printed as JSON), where the bytes themselves would be
/// noise and the digest is what a reviewer or a cache key needs.
#[derive(Clone, PartialEq, Eq)]
#[cfg_attr(feature = "arbitrary", derive(proptest_derive::Arbitrary))]
pub struct Bytes(pub Vec<u8>);

impl Bytes {
    /// `sha256:<hex>`.
    pub fn digest(&self) -> String {
        let hash = Sha256::digest(&self.0);
        format!("sha256:{}", hash.iter().map(|b| format!("{b:02x}")).collect::<String>())
    }
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes, {}", self.0.len(), self.digest())
    }
}

impl Serialize for Bytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&format!("{:?}", self))
        } else {
            s.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            return Err(serde::de::Error::custom(
                "bytes are only read from the wire format (the readable form is a digest)",
            ));
        }
        serde_bytes::ByteBuf::deserialize(d).map(|b| Bytes(b.into_vec()))
    }
}
