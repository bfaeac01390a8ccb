//! Small pure helpers of the search: which device counts to try, how to split layers over stages
//! and sequences over replicas.

use crate::cluster::PlanDevice;

/// Devices in the order the search takes them: fastest first, then most memory, then file order.
pub(crate) fn speed_order(devs: &[PlanDevice]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..devs.len()).collect();
    order.sort_by(|&a, &b| {
        devs[b]
            .flops_per_s
            .total_cmp(&devs[a].flops_per_s)
            .then(devs[b].memory_bytes.cmp(&devs[a].memory_bytes))
            .then(a.cmp(&b))
    });
    order
}

/// A key that is equal for devices the cost model cannot tell apart.
pub(crate) fn profiles(devs: &[PlanDevice]) -> Vec<usize> {
    let key = |d: &PlanDevice| {
        (d.kind, d.flops_per_s.to_bits(), d.memory_bytes, d.memory_bytes_per_s.to_bits(), d.host_ram_bytes)
    };
    let mut seen: Vec<(crate::cluster::DeviceKind, u64, u64, u64, u64)> = Vec::new();
    devs.iter()
        .map(|d| {
            let k = key(d);
            seen.iter().position(|s| *s == k).unwrap_or_else(|| {
                seen.push(k);
                seen.len() - 1
            })
        })
        .collect()
}

/// How many of the fastest devices to try using, most first: all of them, every prefix that ends
/// where the device profile changes (dropping a slower tier), each with up to two fewer so that
/// more pipeline degrees divide the count, and the fastest device alone.
pub(crate) fn device_counts(order: &[usize], profile: &[usize]) -> Vec<usize> {
    let n = order.len();
    let mut ends = vec![n, 1];
    for k in 1..n {
        if profile[order[k]] != profile[order[k - 1]] {
            ends.push(k);
        }
    }
    let mut ks: Vec<usize> = ends.iter().flat_map(|&e| [e, e.saturating_sub(1), e.saturating_sub(2)]).collect();
    ks.retain(|&k| k >= 1);
    ks.sort_unstable_by(|a, b| b.cmp(a));
    ks.dedup();
    ks
}

/// The divisors of `n`, ascending.
pub(crate) fn divisors(n: u64) -> Vec<u64> {
    let mut small = Vec::new();
    let mut large = Vec::new();
    let mut i = 1;
    while i * i <= n {
        if n.is_multiple_of(i) {
            small.push(i);
            if i * i != n {
                large.push(n / i);
            }
        }
        i += 1;
    }
    small.extend(large.into_iter().rev());
    small
}

/// Splits `total` layers over stages to minimize the slowest stage's time, where stage `s` does
/// `work` flops per layer plus `extra[s]`, at `speed[s]` flops/s, holding at most `cap[s]` layers
/// and at least one. `None` when the caps cannot hold every layer.
pub(crate) fn balance_layers(total: u64, work: f64, speed: &[f64], extra: &[f64], cap: &[u64]) -> Option<Vec<u64>> {
    let p = speed.len();
    if cap.contains(&0) || cap.iter().sum::<u64>() < total || (p as u64) > total {
        return None;
    }
    let counts = |t: f64| -> Option<Vec<u64>> {
        let mut n = Vec::with_capacity(p);
        for s in 0..p {
            let fit = ((t * speed[s] - extra[s]) / work).floor();
            if fit < 1.0 {
                return None;
            }
            n.push((fit as u64).min(cap[s]));
        }
        (n.iter().sum::<u64>() >= total).then_some(n)
    };
    let time = |s: usize, n: u64| (n as f64 * work + extra[s]) / speed[s];
    let mut hi = (0..p).map(|s| time(s, cap[s])).fold(0.0, f64::max) * (1.0 + 1e-9) + 1e-12;
    let mut lo = 0.0;
    for _ in 0..100 {
        let mid = 0.5 * (lo + hi);
        if counts(mid).is_some() { hi = mid } else { lo = mid }
    }
    let mut n = counts(hi)?;
    let mut excess = n.iter().sum::<u64>() - total;
    while excess > 0 {
        // Take a layer from the slowest stage that can give one (the later stage on a tie).
        let s =
            (0..p).filter(|&s| n[s] > 1).max_by(|&a, &b| time(a, n[a]).total_cmp(&time(b, n[b])).then(a.cmp(&b)))?;
        n[s] -= 1;
        excess -= 1;
    }
    Some(n)
}

/// Splits `total` sequences over replicas in proportion to their speed (`secs[r]` per sequence),
/// at least one each and at most `cap[r]`, minimizing the slowest replica. `None` when the caps
/// are too small.
pub(crate) fn split_sequences(total: u64, secs: &[f64], cap: &[u64]) -> Option<Vec<u64>> {
    let d = secs.len();
    if (d as u64) > total || cap.contains(&0) || cap.iter().sum::<u64>() < total {
        return None;
    }
    let inv: f64 = secs.iter().map(|s| 1.0 / s).sum();
    let mut b: Vec<u64> = (0..d).map(|r| ((total as f64 / secs[r] / inv).floor() as u64).clamp(1, cap[r])).collect();
    let mut sum: u64 = b.iter().sum();
    while sum > total {
        let r = (0..d)
            .filter(|&r| b[r] > 1)
            .max_by(|&x, &y| (b[x] as f64 * secs[x]).total_cmp(&(b[y] as f64 * secs[y])).then(x.cmp(&y)))?;
        b[r] -= 1;
        sum -= 1;
    }
    while sum < total {
        let r = (0..d)
            .filter(|&r| b[r] < cap[r])
            .min_by(|&x, &y| ((b[x] + 1) as f64 * secs[x]).total_cmp(&((b[y] + 1) as f64 * secs[y])).then(x.cmp(&y)))?;
        b[r] += 1;
        sum += 1;
    }
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divisors_ascend() {
        assert_eq!(divisors(12), vec![1, 2, 3, 4, 6, 12]);
        assert_eq!(divisors(1), vec![1]);
        assert_eq!(divisors(49), vec![1, 7, 49]);
    }

    #[test]
    fn faster_stages_get_more_layers() {
        let n = balance_layers(32, 1.0, &[3.0, 1.0], &[0.0, 0.0], &[32, 32]).unwrap();
        assert_eq!(n, vec![24, 8]);
        // A cap moves layers to the other stage.
        let n = balance_layers(32, 1.0, &[3.0, 1.0], &[0.0, 0.0], &[20, 32]).unwrap();
        assert_eq!(n, vec![20, 12]);
        // Extra work (the LM head) on the last stage leaves it fewer layers.
        let n = balance_layers(10, 1.0, &[1.0, 1.0], &[0.0, 4.0], &[10, 10]).unwrap();
        assert_eq!(n, vec![7, 3]);
        assert!(balance_layers(10, 1.0, &[1.0, 1.0], &[0.0, 0.0], &[4, 5]).is_none());
    }

    #[test]
    fn sequences_follow_speed_within_caps() {
        assert_eq!(split_sequences(8, &[1.0, 3.0], &[8, 8]).unwrap(), vec![6, 2]);
        assert_eq!(split_sequences(8, &[1.0, 3.0], &[4, 8]).unwrap(), vec![4, 4]);
        assert_eq!(split_sequences(3, &[1.0, 100.0, 100.0], &[8, 8, 8]).unwrap(), vec![1, 1, 1]);
        assert!(split_sequences(8, &[1.0, 1.0], &[3, 4]).is_none());
    }
}
