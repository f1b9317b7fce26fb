//! Bearer tokens: random, shown once, stored as SHA-256 hashes.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

pub const API_PREFIX: &str = "hrd_api_";
pub const AGENT_REGISTRATION_PREFIX: &str = "hrd_reg_";
pub const AGENT_ACCESS_PREFIX: &str = "hrd_agt_";

pub fn generate(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes))
}

pub fn hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Compares two tokens without leaking where they differ.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    let (ha, hb) = (hash(a), hash(b));
    ha.iter()
        .zip(hb.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unique_and_hash_stably() {
        let a = generate(API_PREFIX);
        let b = generate(API_PREFIX);
        assert_ne!(a, b);
        assert!(a.starts_with(API_PREFIX));
        assert_eq!(hash(&a), hash(&a));
        assert!(constant_time_eq(&a, &a));
        assert!(!constant_time_eq(&a, &b));
    }
}
