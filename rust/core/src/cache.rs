//! The verified-token cache: a token whose signature and claim shape were checked once is
//! not verified again until it expires. Keyed by SHA-256 of the token bytes; bounded.
//! Only request-independent work is cached (Oathkeeper CVE-2021-32701): time, issuer,
//! audience, binding, replay and revocation are checked on every call by the caller.

use crate::claims::AccessClaims;
use std::sync::Arc;

#[derive(Clone)]
pub struct CachedToken {
    pub claims: Arc<AccessClaims>,
    /// The key that verified it: a hit counts only while the set still holds this very key
    /// under this kid (a kid re-bound to another key must not keep old tokens alive).
    pub kid: Arc<str>,
    pub key: [u8; 32],
}

pub struct VerifiedTokenCache {
    entries: quick_cache::sync::Cache<[u8; 32], CachedToken>,
}

impl VerifiedTokenCache {
    pub fn new(capacity: usize) -> Self {
        VerifiedTokenCache { entries: quick_cache::sync::Cache::new(capacity.max(1)) }
    }

    /// A live entry; expired ones are dropped on sight.
    pub fn get(&self, key: &[u8; 32], now: u64, leeway: u64) -> Option<CachedToken> {
        let hit = self.entries.get(key)?;
        if now >= hit.claims.exp.saturating_add(leeway) {
            self.entries.remove(key);
            return None;
        }
        Some(hit)
    }

    pub fn insert(&self, key: [u8; 32], value: CachedToken) {
        self.entries.insert(key, value);
    }

    pub fn clear(&self) {
        self.entries.clear();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn capacity(&self) -> u64 {
        self.entries.capacity()
    }
}
