//! API keys: generated here, shown to the operator once, stored only as a hash, and shown masked
//! everywhere else (logs, errors, listings).

use rand::RngCore;
use sha2::{Digest, Sha256};

/// A new key: `tg_` + 40 hex characters (160 random bits).
pub fn generate() -> String {
    let mut bytes = [0u8; 20];
    rand::rng().fill_bytes(&mut bytes);
    format!("tg_{}", hex::encode(bytes))
}

/// A new random identifier with a readable prefix, e.g. `key_1f3a9c0b7d2e`.
pub fn new_id(prefix: &str) -> String {
    let mut bytes = [0u8; 6];
    rand::rng().fill_bytes(&mut bytes);
    format!("{prefix}_{}", hex::encode(bytes))
}

/// SHA-256 of pepper || key. Keys carry 160 random bits, so a fast hash is enough; the pepper
/// keeps a leaked table from being matched against keys seen elsewhere.
pub fn hash(pepper: &str, key: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(pepper.as_bytes());
    h.update([0u8]);
    h.update(key.as_bytes());
    h.finalize().into()
}

/// `tg_1a2b…9f3c`: enough to recognise a key, not to use it.
pub fn mask(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() < 12 {
        return "…".to_string();
    }
    let head: String = chars[..7].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}…{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_hashed_and_masked() {
        let (a, b) = (generate(), generate());
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert_ne!(hash("p", &a), hash("p", &b));
        assert_ne!(hash("p", &a), hash("q", &a));
        let m = mask(&a);
        assert!(m.starts_with("tg_") && m.len() < 16 && !m.contains(&a[7..a.len() - 4]));
        assert_eq!(mask("short"), "…");
    }
}
