//! The planner: pure functions from specs to a plan. No I/O, no async, no clock.
//!
//! This build plans data parallelism with ZeRO-1 over N workers; pipeline stages and the cost
//! model come with the full planner.

use crate::ids::Rank;
use serde::{Deserialize, Serialize};

/// Why no plan exists, with the numbers a user needs to fix it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "{nodes} workers cannot split a global batch of {global_batch} sequences (each worker needs at least one); raise train.global_batch to >= {nodes} or use --nodes {global_batch}"
    )]
    BatchTooSmall { nodes: usize, global_batch: usize },
    #[error("--nodes must be at least 1, got 0")]
    NoNodes,
}

/// One rank's share of every global batch: rows `[offset, offset + count)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchShare {
    pub rank: Rank,
    pub offset: usize,
    pub count: usize,
}

/// Splits a global batch of `global_batch` sequences over `nodes` data-parallel ranks as evenly
/// as possible (the first `global_batch % nodes` ranks take one more). Gradients are weighted by
/// tokens, so uneven shares give the same maths as even ones.
pub fn split_batch(nodes: usize, global_batch: usize) -> Result<Vec<BatchShare>, PlanError> {
    if nodes == 0 {
        return Err(PlanError::NoNodes);
    }
    if global_batch < nodes {
        return Err(PlanError::BatchTooSmall { nodes, global_batch });
    }
    let base = global_batch / nodes;
    let extra = global_batch % nodes;
    let mut offset = 0;
    Ok((0..nodes)
        .map(|r| {
            let count = base + usize::from(r < extra);
            let share = BatchShare { rank: Rank(r as u32), offset, count };
            offset += count;
            share
        })
        .collect())
}

/// The contiguous range of a flat parameter vector of `len` elements that `rank` owns under
/// ZeRO (optimizer state, and gradients after reduce-scatter): equal chunks, the last ones one
/// element shorter when `len` does not divide evenly. The ranges partition `0..len`.
pub fn shard_range(len: usize, world: usize, rank: usize) -> std::ops::Range<usize> {
    let base = len / world;
    let extra = len % world;
    let start = rank * base + rank.min(extra);
    let end = start + base + usize::from(rank < extra);
    start..end
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn batch_too_small_says_what_to_do() {
        let e = split_batch(4, 2).unwrap_err().to_string();
        assert!(e.contains("global batch of 2") && e.contains("--nodes 2"), "{e}");
    }

    proptest! {
        #[test]
        fn shares_cover_the_batch_exactly_once(nodes in 1usize..64, extra in 0usize..200) {
            let gb = nodes + extra;
            let shares = split_batch(nodes, gb).unwrap();
            let mut next = 0;
            for s in &shares {
                prop_assert_eq!(s.offset, next);
                prop_assert!(s.count >= 1);
                next += s.count;
            }
            prop_assert_eq!(next, gb);
            let max = shares.iter().map(|s| s.count).max().unwrap();
            let min = shares.iter().map(|s| s.count).min().unwrap();
            prop_assert!(max - min <= 1);
        }

        #[test]
        fn shard_ranges_partition(len in 0usize..10_000, world in 1usize..70) {
            let mut next = 0;
            for r in 0..world {
                let range = shard_range(len, world, r);
                prop_assert_eq!(range.start, next);
                next = range.end;
            }
            prop_assert_eq!(next, len);
        }
    }
}
