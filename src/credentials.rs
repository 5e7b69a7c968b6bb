//! Device credentials for the embedded broker's logins: the secret the hub hands out
//! once, and the salted hash it keeps instead.
//!
//! A secret is 256 bits from the operating system's CSPRNG, so a fast hash is enough:
//! slow password hashes (Argon2, bcrypt) exist to make guessing a *human-chosen*
//! password expensive, and nobody can guess 2^256 possibilities however cheap each try
//! is. SHA-256 over a per-device salt and the secret keeps the stored value useless to
//! someone who reads the database (they cannot log in with it) and makes a login cost
//! one lookup and one hash, which matters when a fleet reconnects at once.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Bytes of randomness in a secret (256 bits).
const SECRET_BYTES: usize = 32;
/// Bytes of per-device salt.
pub const SALT_BYTES: usize = 16;

/// A freshly generated secret: shown once (in the API's answer), never stored or
/// logged. `Debug` hides it.
pub struct DeviceSecret(String);

impl DeviceSecret {
    /// 256 random bits, as unpadded base64url (43 characters: safe in an MQTT
    /// password, a URL, a shell and a config file without quoting).
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; SECRET_BYTES];
        getrandom::fill(&mut bytes)?;
        Ok(Self(URL_SAFE_NO_PAD.encode(bytes)))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// What the store keeps: a fresh salt and the hash of this secret under it.
    pub fn hash(&self) -> Result<CredentialHash, getrandom::Error> {
        let mut salt = [0u8; SALT_BYTES];
        getrandom::fill(&mut salt)?;
        Ok(CredentialHash::new(salt, self.0.as_bytes()))
    }
}

impl fmt::Debug for DeviceSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceSecret(***)")
    }
}

/// A device's stored credential: `SHA-256(salt || secret)` and its salt.
#[derive(Clone, PartialEq, Eq)]
pub struct CredentialHash {
    pub salt: [u8; SALT_BYTES],
    pub hash: [u8; 32],
}

impl CredentialHash {
    fn new(salt: [u8; SALT_BYTES], secret: &[u8]) -> Self {
        let hash = Sha256::new()
            .chain_update(salt)
            .chain_update(secret)
            .finalize()
            .into();
        Self { salt, hash }
    }

    /// Rebuilds a stored credential from its columns; `None` if their lengths are
    /// wrong (a corrupt row).
    pub fn from_parts(salt: &[u8], hash: &[u8]) -> Option<Self> {
        Some(Self {
            salt: salt.try_into().ok()?,
            hash: hash.try_into().ok()?,
        })
    }

    /// Whether `password` is the secret this was made from. Constant time in the
    /// comparison, so the answer's timing says nothing about how close a guess was.
    pub fn verify(&self, password: &[u8]) -> bool {
        let candidate = Self::new(self.salt, password);
        candidate.hash.ct_eq(&self.hash).into()
    }
}

impl fmt::Debug for CredentialHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CredentialHash(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_verifies_against_its_hash_and_nothing_else_does() {
        let secret = DeviceSecret::generate().expect("randomness");
        assert_eq!(secret.expose().len(), 43);
        let stored = secret.hash().expect("randomness");
        assert!(stored.verify(secret.expose().as_bytes()));
        assert!(!stored.verify(b""));
        let other = DeviceSecret::generate().expect("randomness");
        assert_ne!(secret.expose(), other.expose());
        assert!(!stored.verify(other.expose().as_bytes()));
        let mut truncated = secret.expose().to_string();
        truncated.pop();
        assert!(!stored.verify(truncated.as_bytes()));
    }

    #[test]
    fn the_same_secret_hashes_differently_under_each_salt() {
        let secret = DeviceSecret::generate().expect("randomness");
        let (a, b) = (secret.hash().expect("rng"), secret.hash().expect("rng"));
        assert_ne!(a.salt, b.salt);
        assert_ne!(a.hash, b.hash);
        assert!(a.verify(secret.expose().as_bytes()) && b.verify(secret.expose().as_bytes()));
    }

    #[test]
    fn neither_prints_the_secret() {
        let secret = DeviceSecret::generate().expect("randomness");
        let stored = secret.hash().expect("randomness");
        let shown = format!("{secret:?} {stored:?}");
        assert!(!shown.contains(secret.expose()), "{shown}");
    }

    #[test]
    fn a_stored_row_of_the_wrong_length_is_refused() {
        assert!(CredentialHash::from_parts(&[0; 16], &[0; 32]).is_some());
        assert!(CredentialHash::from_parts(&[0; 15], &[0; 32]).is_none());
        assert!(CredentialHash::from_parts(&[0; 16], &[0; 31]).is_none());
    }
}
