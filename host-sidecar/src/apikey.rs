//! API keys: generated here, shown to the operator once, stored only as a hash, and shown masked
//! everywhere else (logs, errors, listings).
//!
//! A key is `tg_` + 40 hex characters (160 random bits) + 8 hex characters of check: the first
//! 4 bytes of HMAC-SHA256(pepper, the random part). A string that is not of that shape, or whose
//! check does not match, cannot be a key this installation issued, and is refused before any
//! lookup — so a flood of made-up keys costs a hash each, never a PostgreSQL query. Without the
//! pepper (`server.key_pepper`) nobody can make a key that passes the check.

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const PREFIX: &str = "tg_";
const RANDOM_HEX: usize = 40;
const CHECK_HEX: usize = 8;
/// Length of every key this sidecar issues.
pub const KEY_LEN: usize = PREFIX.len() + RANDOM_HEX + CHECK_HEX;

fn check(pepper: &str, random_hex: &str) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(pepper.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes a key of any length"));
    mac.update(b"tollgate-api-key\0");
    mac.update(random_hex.as_bytes());
    let tag = mac.finalize().into_bytes();
    hex::encode(&tag[..CHECK_HEX / 2])
}

/// A new key for the installation with this pepper.
pub fn generate(pepper: &str) -> String {
    let mut bytes = [0u8; RANDOM_HEX / 2];
    rand::rng().fill_bytes(&mut bytes);
    let random = hex::encode(bytes);
    format!("{PREFIX}{random}{}", check(pepper, &random))
}

/// Whether `key` could be a key this installation issued: its shape and its check.
pub fn plausible(pepper: &str, key: &str) -> bool {
    let Some(rest) = key.strip_prefix(PREFIX) else {
        return false;
    };
    if key.len() != KEY_LEN || !rest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return false;
    }
    let (random, given) = rest.split_at(RANDOM_HEX);
    bool::from(check(pepper, random).as_bytes().ct_eq(given.as_bytes()))
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
        let (a, b) = (generate("p"), generate("p"));
        assert_ne!(a, b);
        assert_eq!(a.len(), KEY_LEN);
        assert!(plausible("p", &a) && plausible("p", &b));
        assert!(
            !plausible("other pepper", &a),
            "the check is keyed by the pepper"
        );
        let mut flipped = a.clone().into_bytes();
        flipped[10] = if flipped[10] == b'0' { b'1' } else { b'0' };
        assert!(!plausible("p", &String::from_utf8(flipped).unwrap()));
        for junk in [
            "",
            "tg_",
            "sk_live_x",
            &a[..KEY_LEN - 1],
            &format!("{a}0"),
            &a.to_uppercase(),
        ] {
            assert!(!plausible("p", junk), "{junk}");
        }
        assert_ne!(hash("p", &a), hash("p", &b));
        assert_ne!(hash("p", &a), hash("q", &a));
        let m = mask(&a);
        assert!(m.starts_with("tg_") && m.len() < 16 && !m.contains(&a[7..a.len() - 4]));
        assert_eq!(mask("short"), "…");
    }
}
