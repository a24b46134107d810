//! The replay filter: a rotating, time-partitioned bloom filter (fixed memory, atomic bit
//! set, one generation per window, no lock) that marks each replay key "new" (definitely
//! not seen in this process within its window) or "maybe seen".
//!
//! The mark is advisory, for metrics and fast paths: it never refuses anything. The single
//! exact replay record is the caller's state store (DESIGN.md section 3), which settles
//! every key, so a bloom false positive never rejects a legitimate request and no lock is
//! taken on the validation path.

use std::sync::atomic::{AtomicU64, Ordering};

/// Number of bloom generations: an entry is remembered for at least one full window.
const GENERATIONS: usize = 2;
/// The filter is sized for this fraction of the configured false-positive bound, so the
/// rate measured at rated capacity stays within the bound despite sampling noise.
const FP_SIZING_MARGIN: f64 = 0.8;
/// A generation's epoch before its first use.
const UNUSED: u64 = u64::MAX;
/// A generation's epoch while one thread clears it for a new window.
const CLEARING: u64 = u64::MAX - 1;

#[derive(Clone, Copy, Debug)]
pub struct ReplayConfig {
    /// Distinct entries per window the filter is rated for.
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

/// What the filter says about a replay key. Neither answer is a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    /// Not inserted in the current or previous window of this process.
    New,
    /// Maybe inserted before (or a false positive): the exact record decides.
    MaybeSeen,
}

struct Generation {
    epoch: AtomicU64,
    bits: Box<[AtomicU64]>,
}

/// The rotating bloom filter. Lock-free: a rotation is claimed by one thread with a
/// compare-and-swap; a race around it can only mark a key wrongly, which is harmless
/// because the mark decides nothing.
pub struct RotatingBloom {
    generations: [Generation; GENERATIONS],
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
            || Generation { epoch: AtomicU64::new(UNUSED), bits: (0..words).map(|_| AtomicU64::new(0)).collect() };
        RotatingBloom { generations: [generation(), generation()], bit_count, hashes, window_secs }
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

    fn slot(&self, epoch: u64) -> &Generation {
        &self.generations[(epoch % GENERATIONS as u64) as usize]
    }

    /// The generation of `epoch` if it is live, without rotating.
    fn live(&self, epoch: u64) -> Option<&Generation> {
        let g = self.slot(epoch);
        (g.epoch.load(Ordering::Acquire) == epoch).then_some(g)
    }

    /// The generation of `epoch`, cleared for it first if its slot still holds an older
    /// window (a thread that finds another clearing it waits: clearing is a bounded pass
    /// over the bits). None when the slot already holds a newer window (a caller whose
    /// clock is behind): that key then goes unrecorded.
    fn current(&self, epoch: u64) -> Option<&Generation> {
        let g = self.slot(epoch);
        loop {
            let seen = g.epoch.load(Ordering::Acquire);
            if seen == epoch {
                return Some(g);
            }
            if seen == CLEARING {
                std::thread::yield_now();
                continue;
            }
            if seen != UNUSED && seen > epoch {
                return None;
            }
            if g.epoch.compare_exchange(seen, CLEARING, Ordering::AcqRel, Ordering::Acquire).is_err() {
                continue;
            }
            for w in g.bits.iter() {
                w.store(0, Ordering::Relaxed);
            }
            g.epoch.store(epoch, Ordering::Release);
            return Some(g);
        }
    }

    fn contains(&self, g: &Generation, key: &[u8; 32]) -> bool {
        self.positions(key).all(|p| g.bits[(p / 64) as usize].load(Ordering::Relaxed) & (1 << (p % 64)) != 0)
    }

    /// True if `key` may have been inserted in the current or previous generation.
    pub fn might_contain(&self, key: &[u8; 32], now: u64) -> bool {
        let epoch = now / self.window_secs;
        [epoch, epoch.wrapping_sub(1)].iter().any(|&e| self.live(e).is_some_and(|g| self.contains(g, key)))
    }

    /// Inserts `key` into the current generation; true if it was maybe seen before (in
    /// this generation or the previous one).
    pub fn check_and_insert(&self, key: &[u8; 32], now: u64) -> bool {
        let epoch = now / self.window_secs;
        let in_previous = self.live(epoch.wrapping_sub(1)).is_some_and(|g| self.contains(g, key));
        let Some(current) = self.current(epoch) else {
            return true; // not recorded: "maybe" is the only honest answer
        };
        let mut in_current = true;
        for pos in self.positions(key) {
            let (word, mask) = ((pos / 64) as usize, 1u64 << (pos % 64));
            in_current &= current.bits[word].fetch_or(mask, Ordering::Relaxed) & mask != 0;
        }
        in_current || in_previous
    }
}

/// The bloom filter with its counters: what the engine marks replay keys with.
pub struct ReplayCache {
    bloom: RotatingBloom,
    marked: AtomicU64,
    maybe_seen: AtomicU64,
}

impl ReplayCache {
    pub fn new(cfg: ReplayConfig) -> Self {
        ReplayCache {
            bloom: RotatingBloom::new(cfg.capacity, cfg.fp_rate, cfg.window_secs),
            marked: AtomicU64::new(0),
            maybe_seen: AtomicU64::new(0),
        }
    }

    /// Inserts `key` and says whether it may have been seen before. Never refuses: the
    /// state store's exact record decides whether the key is a replay.
    pub fn mark(&self, key: &[u8; 32], now: u64) -> Mark {
        self.marked.fetch_add(1, Ordering::Relaxed);
        if self.bloom.check_and_insert(key, now) {
            self.maybe_seen.fetch_add(1, Ordering::Relaxed);
            Mark::MaybeSeen
        } else {
            Mark::New
        }
    }

    pub fn bloom(&self) -> &RotatingBloom {
        &self.bloom
    }

    /// (keys marked, of which marked "maybe seen").
    pub fn stats(&self) -> (u64, u64) {
        (self.marked.load(Ordering::Relaxed), self.maybe_seen.load(Ordering::Relaxed))
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
    fn a_key_is_new_the_first_time_and_maybe_seen_after() {
        let c = ReplayCache::new(ReplayConfig { capacity: 100, fp_rate: 0.01, window_secs: 60 });
        assert_eq!(c.mark(&key(1, "a"), 1000), Mark::New);
        assert_eq!(c.mark(&key(1, "a"), 1001), Mark::MaybeSeen);
        assert_eq!(c.mark(&key(2, "a"), 1001), Mark::New);
        assert_eq!(c.stats(), (3, 1));
    }

    #[test]
    fn marking_never_refuses_however_many_keys_arrive() {
        // Far beyond rated capacity: every key still gets a mark, and the memory stays put.
        let c = ReplayCache::new(ReplayConfig { capacity: 10, fp_rate: 0.01, window_secs: 60 });
        let before = c.bloom().memory_bytes();
        let maybe = (0..10_000u64).filter(|&i| c.mark(&key(i, "flood"), 1000) == Mark::MaybeSeen).count();
        assert_eq!(c.stats().0, 10_000);
        assert_eq!(c.stats().1, maybe as u64);
        assert_eq!(c.bloom().memory_bytes(), before);
    }

    #[test]
    fn concurrent_inserts_in_one_window_are_all_remembered() {
        let bloom = std::sync::Arc::new(RotatingBloom::new(40_000, 0.001, 60));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let bloom = bloom.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        bloom.check_and_insert(&key(t * 1_000_000 + i, "c"), 1000);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("inserting thread");
        }
        assert!((0..4u64).all(|t| (0..10_000u64).all(|i| bloom.might_contain(&key(t * 1_000_000 + i, "c"), 1000))));
    }

    #[test]
    fn a_caller_behind_the_newest_window_gets_maybe_seen_and_clears_nothing() {
        let bloom = RotatingBloom::new(1000, 0.01, 10);
        assert!(!bloom.check_and_insert(&key(1, "b"), 125));
        // Epoch 10 maps to the slot that now holds epoch 12: it must not be cleared.
        assert!(bloom.check_and_insert(&key(2, "b"), 100));
        assert!(bloom.might_contain(&key(1, "b"), 125));
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
