//! Replay detection for DPoP proofs and single-use tokens.
//!
//! A rotating, time-partitioned bloom filter (fixed memory, atomic bit set, one generation
//! per window) answers "definitely new" or "maybe seen"; an exact, bounded record settles
//! every answer, so a bloom false positive never rejects a legitimate request. When the
//! exact record is full of live entries the request is refused (`Seen::Full`): evicting a
//! live entry would reopen a replay.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

/// Number of bloom generations: an entry is remembered for at least one full window.
const GENERATIONS: usize = 2;
/// The filter is sized for this fraction of the configured false-positive bound, so the
/// rate measured at rated capacity stays within the bound despite sampling noise.
const FP_SIZING_MARGIN: f64 = 0.8;

#[derive(Clone, Copy, Debug)]
pub struct ReplayConfig {
    /// Distinct entries per window the filter is rated for (and the exact record holds
    /// `GENERATIONS` times this).
    pub capacity: usize,
    /// False-positive bound of the bloom filter at rated capacity.
    pub fp_rate: f64,
    /// Generation length in seconds: the longest replay window of a proof.
    pub window_secs: u64,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        ReplayConfig { capacity: 1_000_000, fp_rate: 0.001, window_secs: 65 }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// First time: recorded.
    New,
    /// Seen before and still inside its window.
    Replayed,
    /// Cannot record: the exact record is full of live entries.
    Full,
}

struct Generation {
    epoch: AtomicU64,
    bits: Box<[AtomicU64]>,
}

/// The rotating bloom filter.
pub struct RotatingBloom {
    generations: [Generation; GENERATIONS],
    /// Readers (insert, check) share it; a rotation that clears a generation takes it alone.
    rotation: RwLock<()>,
    bit_count: u64,
    hashes: u32,
    window_secs: u64,
}

impl RotatingBloom {
    pub fn new(capacity: usize, fp_rate: f64, window_secs: u64) -> Self {
        assert!(capacity > 0 && fp_rate > 0.0 && fp_rate < 1.0 && window_secs > 0);
        let p = fp_rate * FP_SIZING_MARGIN;
        let ln2 = std::f64::consts::LN_2;
        let bits = (-(capacity as f64) * p.ln() / (ln2 * ln2)).ceil() as u64;
        let words = bits.div_ceil(64).max(1);
        let bit_count = words * 64;
        let hashes = ((bit_count as f64 / capacity as f64) * ln2).round().clamp(1.0, 32.0) as u32;
        let generation =
            || Generation { epoch: AtomicU64::new(u64::MAX), bits: (0..words).map(|_| AtomicU64::new(0)).collect() };
        RotatingBloom {
            generations: [generation(), generation()],
            rotation: RwLock::new(()),
            bit_count,
            hashes,
            window_secs,
        }
    }

    /// Bytes of bit storage: fixed at construction, whatever the traffic.
    pub fn memory_bytes(&self) -> usize {
        self.generations.iter().map(|g| g.bits.len() * 8).sum()
    }

    pub fn hashes(&self) -> u32 {
        self.hashes
    }

    /// Bit positions by double hashing; `key` is already a uniform digest.
    fn positions(&self, key: &[u8; 32]) -> impl Iterator<Item = u64> + '_ {
        let h1 = u64::from_le_bytes(key[0..8].try_into().expect("8 bytes"));
        let h2 = u64::from_le_bytes(key[8..16].try_into().expect("8 bytes")) | 1;
        (0..self.hashes as u64).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) % self.bit_count)
    }

    fn rotate_to(&self, epoch: u64) {
        let slot = (epoch as usize) % GENERATIONS;
        if self.generations[slot].epoch.load(Ordering::Acquire) == epoch {
            return;
        }
        let _alone = self.rotation.write().unwrap_or_else(|e| e.into_inner());
        let g = &self.generations[slot];
        if g.epoch.load(Ordering::Acquire) != epoch {
            for w in g.bits.iter() {
                w.store(0, Ordering::Relaxed);
            }
            g.epoch.store(epoch, Ordering::Release);
        }
    }

    /// True if `key` may have been inserted in the current or previous generation.
    pub fn might_contain(&self, key: &[u8; 32], now: u64) -> bool {
        let epoch = now / self.window_secs;
        let _shared = self.rotation.read().unwrap_or_else(|e| e.into_inner());
        [epoch, epoch.wrapping_sub(1)].iter().any(|&e| {
            let g = &self.generations[(e as usize) % GENERATIONS];
            g.epoch.load(Ordering::Acquire) == e
                && self.positions(key).all(|p| g.bits[(p / 64) as usize].load(Ordering::Relaxed) & (1 << (p % 64)) != 0)
        })
    }

    /// Inserts `key` into the current generation; true if it was maybe seen before (in
    /// this generation or the previous one).
    pub fn check_and_insert(&self, key: &[u8; 32], now: u64) -> bool {
        let epoch = now / self.window_secs;
        self.rotate_to(epoch);
        let _shared = self.rotation.read().unwrap_or_else(|e| e.into_inner());
        let current = &self.generations[(epoch as usize) % GENERATIONS];
        let previous = &self.generations[(epoch as usize + GENERATIONS - 1) % GENERATIONS];
        let previous_live = previous.epoch.load(Ordering::Acquire) == epoch.wrapping_sub(1);
        let (mut in_current, mut in_previous) = (true, previous_live);
        for pos in self.positions(key) {
            let (word, mask) = ((pos / 64) as usize, 1u64 << (pos % 64));
            in_current &= current.bits[word].fetch_or(mask, Ordering::Relaxed) & mask != 0;
            if in_previous {
                in_previous &= previous.bits[word].load(Ordering::Relaxed) & mask != 0;
            }
        }
        in_current || in_previous
    }
}

/// Expired records purged per call: more than the one a call can add, so the record
/// shrinks back as traffic falls, without a pause to sweep the whole map.
const PURGE_PER_CALL: usize = 4;

struct ExactRecord {
    expiries: HashMap<[u8; 32], u64>,
    /// Every record by the time it may be forgotten, soonest first. An entry whose key was
    /// re-recorded with a later time is stale and skipped when it comes up.
    by_expiry: BinaryHeap<Reverse<(u64, [u8; 32])>>,
}

impl ExactRecord {
    /// Forgets at most `limit` records whose time has come.
    fn purge(&mut self, now: u64, limit: usize) {
        for _ in 0..limit {
            match self.by_expiry.peek() {
                Some(Reverse((until, _))) if *until <= now => {}
                _ => return,
            }
            let Reverse((until, key)) = self.by_expiry.pop().expect("peeked");
            if self.expiries.get(&key) == Some(&until) {
                self.expiries.remove(&key);
            }
        }
    }
}

/// Bloom filter plus exact confirmation.
pub struct ReplayCache {
    bloom: RotatingBloom,
    exact: Mutex<ExactRecord>,
    exact_capacity: usize,
    bloom_maybe: AtomicU64,
    bloom_false_positives: AtomicU64,
}

impl ReplayCache {
    pub fn new(cfg: ReplayConfig) -> Self {
        let exact_capacity = cfg.capacity.saturating_mul(GENERATIONS);
        ReplayCache {
            bloom: RotatingBloom::new(cfg.capacity, cfg.fp_rate, cfg.window_secs),
            exact: Mutex::new(ExactRecord { expiries: HashMap::new(), by_expiry: BinaryHeap::new() }),
            exact_capacity,
            bloom_maybe: AtomicU64::new(0),
            bloom_false_positives: AtomicU64::new(0),
        }
    }

    /// Records `key` until `expires_at` (Unix seconds) unless it is already recorded.
    pub fn check_and_record(&self, key: &[u8; 32], expires_at: u64, now: u64) -> Seen {
        let maybe_seen = self.bloom.check_and_insert(key, now);
        let mut record = self.exact.lock().unwrap_or_else(|e| e.into_inner());
        if maybe_seen {
            self.bloom_maybe.fetch_add(1, Ordering::Relaxed);
            match record.expiries.get(key) {
                Some(&exp) if exp > now => return Seen::Replayed,
                _ => {
                    self.bloom_false_positives.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        record.purge(now, PURGE_PER_CALL);
        if record.expiries.len() >= self.exact_capacity && !record.expiries.contains_key(key) {
            record.purge(now, usize::MAX);
            if record.expiries.len() >= self.exact_capacity {
                return Seen::Full;
            }
        }
        // The exact record decides even when the bloom said "new" (it may have rotated out).
        match record.expiries.insert(*key, expires_at) {
            Some(exp) if exp > now => {
                record.expiries.insert(*key, exp);
                Seen::Replayed
            }
            _ => {
                record.by_expiry.push(Reverse((expires_at, *key)));
                Seen::New
            }
        }
    }

    pub fn bloom(&self) -> &RotatingBloom {
        &self.bloom
    }

    /// (bloom "maybe seen" answers, of which false positives settled by the exact record).
    pub fn stats(&self) -> (u64, u64) {
        (self.bloom_maybe.load(Ordering::Relaxed), self.bloom_false_positives.load(Ordering::Relaxed))
    }

    pub fn len(&self) -> usize {
        self.exact.lock().unwrap_or_else(|e| e.into_inner()).expiries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn key(i: u64, salt: &str) -> [u8; 32] {
        Sha256::new().chain_update(salt).chain_update(i.to_le_bytes()).finalize().into()
    }

    #[test]
    fn same_key_twice_is_a_replay_new_key_is_not() {
        let c = ReplayCache::new(ReplayConfig { capacity: 100, fp_rate: 0.01, window_secs: 60 });
        assert_eq!(c.check_and_record(&key(1, "a"), 1060, 1000), Seen::New);
        assert_eq!(c.check_and_record(&key(1, "a"), 1060, 1001), Seen::Replayed);
        assert_eq!(c.check_and_record(&key(2, "a"), 1060, 1001), Seen::New);
        // After its window the same key is new again (the proof's iat check refuses it anyway).
        assert_eq!(c.check_and_record(&key(1, "a"), 1200, 1100), Seen::New);
    }

    #[test]
    fn full_record_refuses_rather_than_evicts() {
        let c = ReplayCache::new(ReplayConfig { capacity: 2, fp_rate: 0.01, window_secs: 60 });
        for i in 0..4 {
            assert_eq!(c.check_and_record(&key(i, "f"), 2000, 1000), Seen::New);
        }
        assert_eq!(c.check_and_record(&key(9, "f"), 2000, 1000), Seen::Full);
        assert_eq!(c.check_and_record(&key(0, "f"), 2000, 1000), Seen::Replayed, "live entries kept");
        assert_eq!(c.check_and_record(&key(9, "f"), 3000, 2001), Seen::New, "expired entries purged");
    }

    #[test]
    fn expired_records_are_forgotten_as_traffic_goes_on() {
        let c = ReplayCache::new(ReplayConfig { capacity: 100_000, fp_rate: 0.01, window_secs: 60 });
        // 100 records a second, each kept 60 s, for 10 minutes: about 6,000 live at a time.
        for t in 0..600u64 {
            for i in 0..100u64 {
                assert_eq!(c.check_and_record(&key(t * 1000 + i, "steady"), 1000 + t + 60, 1000 + t), Seen::New);
            }
        }
        assert!(c.len() <= 6_100, "{} records held", c.len());
    }

    #[test]
    fn bloom_false_positive_rate_at_rated_capacity_is_within_bound() {
        for (capacity, fp_rate) in [(10_000usize, 0.01f64), (50_000, 0.001)] {
            let bloom = RotatingBloom::new(capacity, fp_rate, 60);
            for i in 0..capacity as u64 {
                bloom.check_and_insert(&key(i, "member"), 1000);
            }
            let probes = 400_000u64;
            let false_positives = (0..probes).filter(|&i| bloom.might_contain(&key(i, "stranger"), 1000)).count();
            let measured = false_positives as f64 / probes as f64;
            assert!(measured <= fp_rate, "capacity {capacity}: measured {measured} > bound {fp_rate}");
            assert!((0..capacity as u64).all(|i| bloom.might_contain(&key(i, "member"), 1000)), "no false negatives");
        }
    }

    #[test]
    fn bloom_memory_is_fixed_by_configuration() {
        let bloom = RotatingBloom::new(10_000, 0.01, 1);
        let before = bloom.memory_bytes();
        for i in 0..200_000u64 {
            bloom.check_and_insert(&key(i, "m"), i / 1000);
        }
        assert_eq!(bloom.memory_bytes(), before);
    }

    #[test]
    fn rotation_forgets_after_two_windows() {
        let bloom = RotatingBloom::new(1000, 0.01, 10);
        assert!(!bloom.check_and_insert(&key(1, "r"), 100));
        assert!(bloom.check_and_insert(&key(1, "r"), 115), "previous generation still consulted");
        assert!(!bloom.check_and_insert(&key(2, "r"), 130));
        assert!(!bloom.check_and_insert(&key(1, "r"), 150), "two windows later it is gone");
    }
}
