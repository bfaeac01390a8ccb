//! The one global order of samples for a run.
//!
//! Global sample `g` (a counter over the whole run, shared by every worker) is window
//! `perm_e[g % n]` of epoch `e = g / n`, where `perm_e` is a Fisher-Yates shuffle of `0..n` driven
//! by SplitMix64 seeded from `(seed, e)`. The PRNG is written here so the order never changes
//! with a dependency bump; `golden_order_is_pinned` fails if it ever does.

use super::DataError;

/// Most windows one order holds (the permutation is kept in memory as `u32`s: 16 GiB at most).
pub const MAX_WINDOWS: u64 = u32::MAX as u64 + 1;

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and stable by construction.
#[derive(Clone, Debug)]
struct SplitMix64(u64);

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 output function, a bijective 64-bit mixer.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN_GAMMA);
        mix(self.0)
    }

    /// Uniform in `0..bound` (`bound > 0`), without modulo bias (Lemire's method).
    fn below(&mut self, bound: u64) -> u64 {
        let threshold = bound.wrapping_neg() % bound;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(bound);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
}

/// The PRNG stream of one epoch.
fn epoch_rng(seed: u64, epoch: u64) -> SplitMix64 {
    SplitMix64(mix(seed ^ GOLDEN_GAMMA) ^ mix(epoch.wrapping_add(1).wrapping_mul(GOLDEN_GAMMA)))
}

/// The deterministic order of `num_windows` windows for a seed, with the current epoch's
/// permutation cached.
#[derive(Clone, Debug)]
pub struct SampleOrder {
    num_windows: u64,
    seed: u64,
    epoch: u64,
    perm: Vec<u32>,
}

impl SampleOrder {
    /// An order over `num_windows` windows; an error when there are none (the dataset is
    /// shorter than one window) or more than [`MAX_WINDOWS`].
    pub fn new(num_windows: u64, seed: u64) -> Result<SampleOrder, DataError> {
        if num_windows == 0 {
            return Err(DataError::NoWindows);
        }
        if num_windows > MAX_WINDOWS {
            return Err(DataError::TooManyWindows { num_windows, max: MAX_WINDOWS });
        }
        let mut order = SampleOrder { num_windows, seed, epoch: 0, perm: Vec::new() };
        order.shuffle(0);
        Ok(order)
    }

    /// Windows per epoch.
    pub fn num_windows(&self) -> u64 {
        self.num_windows
    }

    /// The seed the order was made with.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The epoch global sample `global_sample` falls in.
    pub fn epoch_of(&self, global_sample: u64) -> u64 {
        global_sample / self.num_windows
    }

    /// The window global sample `global_sample` reads. Moving to another epoch reshuffles
    /// (O(`num_windows`)); within an epoch this is a lookup.
    pub fn window_for(&mut self, global_sample: u64) -> u64 {
        let epoch = self.epoch_of(global_sample);
        if epoch != self.epoch {
            self.shuffle(epoch);
        }
        u64::from(self.perm[(global_sample % self.num_windows) as usize])
    }

    fn shuffle(&mut self, epoch: u64) {
        let n = self.num_windows;
        let mut rng = epoch_rng(self.seed, epoch);
        self.perm.clear();
        // `n <= MAX_WINDOWS`, so every index fits a u32.
        self.perm.extend((0..n).map(|i| i as u32));
        for i in (1..n).rev() {
            let j = rng.below(i + 1);
            self.perm.swap(i as usize, j as usize);
        }
        self.epoch = epoch;
    }
}

/// Windows of global samples `first .. first + count`.
pub fn sample_rows(order: &mut SampleOrder, first: u64, count: usize) -> Vec<u64> {
    (first..first + count as u64).map(|g| order.window_for(g)).collect()
}

/// The rows of global batch `step` that one worker owns: global samples
/// `step*global_batch + offset .. + count`. The global batch size is a constant of a run; the
/// workers of a data-parallel group split it by `offset`/`count`, so any split (and any
/// resharding at a step boundary) reads the same windows in the same order.
///
/// # Panics
/// If `offset + count > global_batch` (a plan bug), or the sample counter overflows `u64`.
pub fn batch_rows(order: &mut SampleOrder, step: u64, global_batch: usize, offset: usize, count: usize) -> Vec<u64> {
    assert!(
        offset.checked_add(count).is_some_and(|end| end <= global_batch),
        "rows {offset}..{offset}+{count} do not fit in a global batch of {global_batch}"
    );
    let first = step
        .checked_mul(global_batch as u64)
        .and_then(|s| s.checked_add(offset as u64))
        .expect("global sample counter overflows u64");
    sample_rows(order, first, count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(order: &mut SampleOrder, e: u64) -> Vec<u64> {
        let n = order.num_windows();
        sample_rows(order, e * n, n as usize)
    }

    fn is_permutation(v: &[u64]) -> bool {
        let mut s = v.to_vec();
        s.sort_unstable();
        s.iter().enumerate().all(|(i, &w)| w == i as u64)
    }

    #[test]
    fn each_epoch_is_a_permutation_and_epochs_differ() {
        for n in [1, 2, 3, 10, 1000] {
            let mut order = SampleOrder::new(n, 7).unwrap();
            let e0 = epoch(&mut order, 0);
            let e1 = epoch(&mut order, 1);
            assert!(is_permutation(&e0) && is_permutation(&e1), "n {n}");
            if n >= 10 {
                assert_ne!(e0, e1, "n {n}");
                assert_ne!(e0, (0..n).collect::<Vec<_>>(), "n {n}: not shuffled");
            }
            assert_eq!(order.epoch_of(n), 1);
        }
    }

    #[test]
    fn same_seed_same_order_other_seed_other_order() {
        let mut a = SampleOrder::new(500, 42).unwrap();
        let mut b = SampleOrder::new(500, 42).unwrap();
        let mut c = SampleOrder::new(500, 43).unwrap();
        let (ra, rb, rc) = (sample_rows(&mut a, 0, 1500), sample_rows(&mut b, 0, 1500), sample_rows(&mut c, 0, 1500));
        assert_eq!(ra, rb);
        assert_ne!(ra, rc);
    }

    #[test]
    fn order_does_not_depend_on_access_pattern() {
        let mut forward = SampleOrder::new(37, 3).unwrap();
        let want = sample_rows(&mut forward, 0, 37 * 4);
        let mut jumpy = SampleOrder::new(37, 3).unwrap();
        for g in [100u64, 5, 140, 36, 37, 0, 111, 74] {
            assert_eq!(jumpy.window_for(g), want[g as usize], "sample {g}");
        }
    }

    #[test]
    fn workers_split_a_global_batch_into_the_one_worker_rows() {
        // 10 windows and a global batch of 4: steps 2 and 4 straddle epoch boundaries.
        let mut one = SampleOrder::new(10, 11).unwrap();
        let mut w0 = SampleOrder::new(10, 11).unwrap();
        let mut w1 = SampleOrder::new(10, 11).unwrap();
        let mut all = Vec::new();
        for step in 0..10 {
            let whole = batch_rows(&mut one, step, 4, 0, 4);
            let mut split = batch_rows(&mut w0, step, 4, 0, 3);
            split.extend(batch_rows(&mut w1, step, 4, 3, 1));
            assert_eq!(whole, split, "step {step}");
            all.extend(whole);
        }
        // Whatever the batch boundaries, each epoch reads every window exactly once.
        for e in all.chunks(10) {
            assert!(is_permutation(e));
        }
    }

    #[test]
    fn golden_order_is_pinned() {
        // If this fails, the order of every run changed: that breaks resuming old checkpoints.
        let mut order = SampleOrder::new(10, 42).unwrap();
        assert_eq!(sample_rows(&mut order, 0, 20), GOLDEN_SEED42_N10);
    }
    const GOLDEN_SEED42_N10: [u64; 20] = [4, 9, 1, 3, 5, 7, 2, 6, 0, 8, 9, 7, 5, 1, 8, 6, 0, 4, 3, 2];

    #[test]
    fn below_stays_in_range() {
        let mut rng = SplitMix64(0);
        for bound in [1u64, 2, 3, 7, 1 << 40, u64::MAX] {
            for _ in 0..100 {
                assert!(rng.below(bound) < bound);
            }
        }
    }

    #[test]
    fn zero_windows_is_an_actionable_error() {
        let msg = SampleOrder::new(0, 1).unwrap_err().to_string();
        assert!(msg.contains("seq_len+1"), "{msg}");
    }

    #[test]
    #[should_panic(expected = "do not fit")]
    fn rows_outside_the_batch_panic() {
        let mut order = SampleOrder::new(10, 1).unwrap();
        batch_rows(&mut order, 0, 4, 3, 2);
    }
}
