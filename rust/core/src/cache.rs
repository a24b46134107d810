//! The verified-token cache: a token whose signature and claim shape were checked once is
//! not verified again until it expires. Keyed by SHA-256 of the token bytes; bounded.
//! Only request-independent work is cached (Oathkeeper CVE-2021-32701): time, issuer,
//! audience, binding, replay and revocation are checked on every call by the caller.
//!
//! Entries leave when their token expires, not only when the cache is full: quick_cache
//! evicts by capacity alone, so without this a broker issuing a few thousand tokens a
//! minute grew for as long as it took to hold `capacity` dead tokens (about 1 KB each:
//! 100 MB at the default), which a soak shows as memory that never levels off. Each insert
//! also drops entries whose time has passed (soonest first, at most 64), from a heap of
//! expiries.

use crate::claims::AccessClaims;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex};

#[derive(Clone)]
pub struct CachedToken {
    pub claims: Arc<AccessClaims>,
    /// The key that verified it: a hit counts only while the set still holds this very key
    /// under this kid (a kid re-bound to another key must not keep old tokens alive).
    pub kid: Arc<str>,
    pub key: [u8; 32],
}

/// (the second from which an entry is dead, its key), ordered soonest first in a heap.
type Expiry = Reverse<(u64, [u8; 32])>;

/// Dead entries one insert removes at most: after an idle hour a single insert would
/// otherwise remove them all while holding the lock every other insert waits for. Any
/// bound of 2 or more drains faster than inserts add.
const MAX_REMOVALS_PER_INSERT: usize = 64;

pub struct VerifiedTokenCache {
    entries: quick_cache::sync::Cache<[u8; 32], CachedToken>,
    /// Every entry's expiry, soonest first. At most `max_expiries` (twice the capacity):
    /// past that the soonest is forgotten here, and its entry leaves by capacity or when
    /// next looked up, as before.
    expiries: Mutex<BinaryHeap<Expiry>>,
    max_expiries: usize,
}

impl VerifiedTokenCache {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        VerifiedTokenCache {
            entries: quick_cache::sync::Cache::new(capacity),
            expiries: Mutex::new(BinaryHeap::new()),
            max_expiries: capacity.saturating_mul(2),
        }
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

    /// Caches `value` until its token expires (`exp` plus `leeway`), and drops entries dead
    /// at `now`, soonest first, at most `MAX_REMOVALS_PER_INSERT` of them.
    pub fn insert(&self, key: [u8; 32], value: CachedToken, now: u64, leeway: u64) {
        let dead_from = value.claims.exp.saturating_add(leeway);
        if now >= dead_from {
            return; // `get` would drop it on sight
        }
        self.entries.insert(key, value);
        let mut expiries = self.expiries.lock().unwrap_or_else(|e| e.into_inner());
        expiries.push(Reverse((dead_from, key)));
        let mut removed = 0;
        while let Some(&Reverse((at, soonest))) = expiries.peek() {
            let dead = at <= now;
            if !(dead && removed < MAX_REMOVALS_PER_INSERT) && expiries.len() <= self.max_expiries {
                break;
            }
            expiries.pop();
            if dead {
                // Another token with the same bytes has the same expiry: nothing live is lost.
                self.entries.remove(&soonest);
                removed += 1;
            }
        }
    }

    pub fn clear(&self) {
        self.entries.clear();
        self.expiries.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Expiries held (for the bound's tests).
    pub fn expiries_len(&self) -> usize {
        self.expiries.lock().unwrap_or_else(|e| e.into_inner()).len()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn token(exp: u64) -> CachedToken {
        let claims = AccessClaims {
            iss: "https://broker.test".into(),
            sub: "c".into(),
            client_id: "c".into(),
            aud: "https://mcp.test/mcp".into(),
            sid: "s".into(),
            jti: format!("j{exp}"),
            iat: exp - 300,
            nbf: exp - 300,
            exp,
            scope: String::new(),
            cnf: None,
            once: false,
            attested_sub: None,
            usage_window: None,
        };
        CachedToken { claims: Arc::new(claims), kid: Arc::from("k"), key: [0; 32] }
    }

    fn key(i: u64) -> [u8; 32] {
        let mut k = [0u8; 32];
        k[..8].copy_from_slice(&i.to_le_bytes());
        k
    }

    #[test]
    fn an_expired_entry_leaves_when_a_later_token_arrives_without_being_looked_up() {
        let cache = VerifiedTokenCache::new(1000);
        for i in 0..100 {
            cache.insert(key(i), token(1300 + i), 1000, 5);
        }
        assert_eq!(cache.len(), 100);
        // At 1355 the tokens with exp + 5 <= 1355 (exp 1300..=1350: 51 of them) are dead.
        cache.insert(key(1000), token(2000), 1355, 5);
        assert_eq!(cache.len(), 100 - 51 + 1);
        assert_eq!(cache.expiries_len(), cache.len());
        assert!(cache.get(&key(51), 1355, 5).is_some(), "exp 1351 lives until 1356");
        assert!(cache.get(&key(50), 1355, 5).is_none());
    }

    #[test]
    fn after_an_idle_spell_the_dead_leave_a_bounded_number_per_insert() {
        let cache = VerifiedTokenCache::new(10_000);
        for i in 0..1000 {
            cache.insert(key(i), token(1300), 1000, 5);
        }
        cache.insert(key(5000), token(9000), 8000, 5);
        assert_eq!(cache.len(), 1001 - MAX_REMOVALS_PER_INSERT);
        for i in 0..20 {
            cache.insert(key(6000 + i), token(9000), 8000, 5);
        }
        assert_eq!(cache.len(), 21, "every dead entry gone after 1000 / 64 more inserts");
        assert_eq!(cache.expiries_len(), 21);
    }

    #[test]
    fn a_token_already_dead_is_not_cached() {
        let cache = VerifiedTokenCache::new(10);
        cache.insert(key(1), token(1000), 1005, 5);
        assert!(cache.is_empty());
        assert_eq!(cache.expiries_len(), 0);
    }

    #[test]
    fn the_expiries_stay_bounded_when_live_tokens_outnumber_the_capacity() {
        let cache = VerifiedTokenCache::new(10);
        for i in 0..1000 {
            cache.insert(key(i), token(100_000 + i), 1000, 5);
        }
        assert!(cache.len() <= 10 + 1, "quick_cache holds about its capacity: {}", cache.len());
        assert_eq!(cache.expiries_len(), 20);
        cache.clear();
        assert_eq!((cache.len(), cache.expiries_len()), (0, 0));
    }

    #[test]
    fn memory_follows_the_live_tokens_under_a_steady_stream() {
        // 10 tokens a second, each living 300 s: about 3,000 live, whatever the capacity.
        let cache = VerifiedTokenCache::new(100_000);
        let mut n = 0u64;
        for second in 1000..5000u64 {
            for _ in 0..10 {
                cache.insert(key(n), token(second + 300), second, 5);
                n += 1;
            }
        }
        assert!((3000..=3060).contains(&cache.len()), "{} entries for 3,050 live tokens", cache.len());
        assert_eq!(cache.expiries_len(), cache.len());
    }
}
