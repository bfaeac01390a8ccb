//! CPU plumbing shared by the kernels: element conversion (all math is f32), addressing the rows
//! of a strided layout, a deterministic row-parallel driver and lane-split reductions.

use std::ops::Range;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Tensor, WithDType};
use rayon::prelude::*;

use crate::error::KernelError;

/// Roughly how many element operations a parallel task should get. Smaller jobs run on the
/// calling thread. The chunking depends only on this and the row size, never on the thread
/// count, so reductions over chunks give the same bits on every machine.
const PAR_GRAIN: usize = 32 * 1024;

/// An element type of the fused kernels: stored as itself, computed in f32. (candle's
/// `WithDType` conversions go through f64 and are not inlined across crates, which stops the
/// loops from vectorising.)
pub(crate) trait Elem: WithDType {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Elem for half::bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
}

impl Elem for half::f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        half::f16::from_f32(v)
    }
}

/// Loads an element as f32.
#[inline(always)]
pub(crate) fn ld<T: Elem>(v: T) -> f32 {
    v.to_f32()
}

/// Stores an f32 as an element.
#[inline(always)]
pub(crate) fn st<T: Elem>(v: f32) -> T {
    T::from_f32(v)
}

/// Runs `$body` with each `$v` bound to the typed `Vec` of the storage `$s`, for the float
/// dtypes the kernels support (all storages must share the dtype).
macro_rules! dispatch_float {
    ($op:expr, ($($s:expr),+), |$($v:ident),+| $body:expr) => {
        match ($($s,)+) {
            ($(candle_core::CpuStorage::F32($v),)+) => $body,
            ($(candle_core::CpuStorage::BF16($v),)+) => $body,
            ($(candle_core::CpuStorage::F16($v),)+) => $body,
            _ => Err($crate::cpu::dtype_error($op, &[$($s),+])),
        }
    };
}
pub(crate) use dispatch_float;

/// The error for storages `dispatch_float!` cannot take.
pub(crate) fn dtype_error(op: &'static str, storages: &[&CpuStorage]) -> candle_core::Error {
    let first = storages[0].dtype();
    let mismatch = storages.iter().find(|s| s.dtype() != first);
    match mismatch {
        Some(s) => KernelError::DTypeMismatch {
            op,
            what: "an input",
            other: "the first input",
            got: s.dtype(),
            expected: first,
        },
        None => KernelError::UnsupportedDType { op, what: "the input", dtype: first },
    }
    .into()
}

/// The elements of a contiguous layout.
pub(crate) fn contiguous<'a, T>(op: &'static str, what: &'static str, data: &'a [T], l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => Err(KernelError::Layout {
            op,
            what,
            detail: format!("not contiguous: shape {:?}, stride {:?}", l.dims(), l.stride()),
        }
        .into()),
    }
}

/// Addresses the rows (last dimension) of a layout whose last stride is 1; the leading
/// dimensions may have any strides (transposed, narrowed or broadcast views).
pub(crate) struct Rows {
    start: usize,
    /// Elements per row.
    pub(crate) len: usize,
    /// Number of rows.
    pub(crate) count: usize,
    contiguous: bool,
    lead_dims: Vec<usize>,
    lead_strides: Vec<usize>,
}

impl Rows {
    pub(crate) fn new(op: &'static str, what: &'static str, l: &Layout) -> Result<Self> {
        let dims = l.dims();
        let stride = l.stride();
        let Some((&len, lead)) = dims.split_last() else {
            return Err(KernelError::Layout { op, what, detail: "rank 0".to_string() }.into());
        };
        if len > 1 && stride[dims.len() - 1] != 1 {
            return Err(KernelError::Layout {
                op,
                what,
                detail: format!("last stride {} is not 1", stride[dims.len() - 1]),
            }
            .into());
        }
        Ok(Self {
            start: l.start_offset(),
            len,
            count: lead.iter().product(),
            contiguous: l.is_contiguous(),
            lead_dims: lead.to_vec(),
            lead_strides: stride[..lead.len()].to_vec(),
        })
    }

    /// Offset of the first element of row `r` (rows in row-major order of the leading dims).
    #[inline]
    pub(crate) fn offset(&self, r: usize) -> usize {
        if self.contiguous {
            return self.start + r * self.len;
        }
        let mut rem = r;
        let mut off = self.start;
        for (&d, &s) in self.lead_dims.iter().zip(&self.lead_strides).rev() {
            off += (rem % d) * s;
            rem /= d;
        }
        off
    }

    /// Row `r` of `data`.
    #[inline]
    pub(crate) fn row<'a, T>(&self, data: &'a [T], r: usize) -> &'a [T] {
        let o = self.offset(r);
        &data[o..o + self.len]
    }
}

/// Splits `n_rows` rows into chunks of about `PAR_GRAIN` work and calls `f(rows, out_chunk)` on
/// each, in parallel when there is more than one chunk. `out` holds `out_row_len` elements per
/// row (`out_row_len` may be 0, then every `out_chunk` is empty). Results come back in row order.
pub(crate) fn for_row_chunks<T: Send, R: Send>(
    n_rows: usize,
    work_per_row: usize,
    out: &mut [T],
    out_row_len: usize,
    f: impl Fn(Range<usize>, &mut [T]) -> R + Sync,
) -> Vec<R> {
    debug_assert_eq!(out.len(), n_rows * out_row_len);
    if n_rows == 0 {
        return Vec::new();
    }
    let rows_per_chunk = (PAR_GRAIN / work_per_row.max(1)).max(1);
    let n_chunks = n_rows.div_ceil(rows_per_chunk);
    let rows = |i: usize| i * rows_per_chunk..((i + 1) * rows_per_chunk).min(n_rows);
    if n_chunks == 1 {
        return vec![f(0..n_rows, out)];
    }
    if out_row_len == 0 {
        (0..n_chunks).into_par_iter().map(|i| f(rows(i), &mut [])).collect()
    } else {
        out.par_chunks_mut(rows_per_chunk * out_row_len).enumerate().map(|(i, chunk)| f(rows(i), chunk)).collect()
    }
}

/// Elementwise driver: calls `f(range, out_chunk)` over chunks of `out`, in parallel when large.
pub(crate) fn for_elem_chunks<T: Send>(out: &mut [T], f: impl Fn(Range<usize>, &mut [T]) + Sync) {
    let n = out.len();
    for_row_chunks(n, 1, out, 1, f);
}

/// `e^x` in branch-free f32 code that vectorises (libm's `expf` does not): Cephes' `expf`
/// reduction and polynomial, within 2 ulp of the true value on `[-87, 88.3]`. Below
/// `-127 ln 2` (so for `-inf`) it is exactly 0, above about 88.4 `+inf`; NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    /// `-127 ln 2`: there `2^n` is 0.0 (exponent field 0).
    const LO: f32 = -88.029_69;
    /// `128 ln 2`: there `2^n` is +inf (exponent field 255).
    const HI: f32 = 88.722_84;
    /// 1.5 * 2^23: adding it rounds to an integer, which then sits in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const P: [f32; 6] = [1.987_569_1e-4, 1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5];
    let xc = x.clamp(LO, HI);
    let k = xc * std::f32::consts::LOG2_E + MAGIC;
    let n = k - MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let poly = P[1..].iter().fold(P[0], |acc, &c| acc * r + c);
    let e_r = poly * (r * r) + r + 1.0;
    // 2^n from the integer n in k's mantissa; n + 127 is in [0, 255] on [LO, HI].
    // Wrapping ops: no overflow is possible, and overflow checks (dev builds) would stop the
    // loops that call this from vectorising.
    let n_int = (k.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    e_r * f32::from_bits((n_int.wrapping_add(127) << 23) as u32)
}

const LANES: usize = 8;

/// Elements mapped per block by [`sum_map`] and [`sum_map2`] before accumulating.
const BLOCK: usize = 64;

/// `Σ f(x)`, vectorised: `f` is mapped over a block into a buffer (a plain loop, even when `f`
/// is as large as [`exp`]), then the buffer is added into independent lane accumulators.
#[inline]
pub(crate) fn sum_map<T: Copy>(xs: &[T], f: impl Fn(T) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut buf = [0f32; BLOCK];
    let blocks = xs.chunks_exact(BLOCK);
    let rest = blocks.remainder();
    for block in blocks {
        for (b, &x) in buf.iter_mut().zip(block) {
            *b = f(x);
        }
        add_lanes(&mut acc, &buf);
    }
    let mut s: f32 = acc.iter().sum();
    for &x in rest {
        s += f(x);
    }
    s
}

/// `Σ f(a, b)` over two equally long slices, blocked like [`sum_map`].
#[inline]
pub(crate) fn sum_map2<A: Copy, B: Copy>(a: &[A], b: &[B], f: impl Fn(A, B) -> f32) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; LANES];
    let mut buf = [0f32; BLOCK];
    let (ca, cb) = (a.chunks_exact(BLOCK), b.chunks_exact(BLOCK));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for ((o, &x), &y) in buf.iter_mut().zip(xa).zip(xb) {
            *o = f(x, y);
        }
        add_lanes(&mut acc, &buf);
    }
    let mut s: f32 = acc.iter().sum();
    for (&x, &y) in ra.iter().zip(rb) {
        s += f(x, y);
    }
    s
}

#[inline(always)]
fn add_lanes(acc: &mut [f32; LANES], buf: &[f32; BLOCK]) {
    for c in buf.chunks_exact(LANES) {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
}

/// The largest element (NaN-ignoring, `-inf` for an empty row), lane-split.
#[inline]
pub(crate) fn max_f32<T: Elem>(xs: &[T]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (m, &x) in acc.iter_mut().zip(c) {
            let x = ld(x);
            *m = if x > *m { x } else { *m };
        }
    }
    let mut m = acc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for &x in rest {
        m = m.max(ld(x));
    }
    m
}

/// `t` itself when its last dimension has stride 1 (what [`Rows`] needs), else a contiguous copy.
pub(crate) fn unit_last_stride(t: &Tensor) -> Result<Tensor> {
    if !t.device().is_cpu() {
        // The CUDA kernels index contiguous buffers.
        return t.contiguous();
    }
    let l = t.layout();
    match l.stride().last() {
        Some(&s) if s != 1 && l.dims().last().is_some_and(|&d| d > 1) => t.contiguous(),
        _ => Ok(t.clone()),
    }
}

/// Splits the flat output of a backward kernel that packs several gradients one after the
/// other (one pass computes them all) into tensors of the given shapes.
pub(crate) fn unpack(packed: &Tensor, shapes: &[&[usize]]) -> Result<Vec<Tensor>> {
    let mut start = 0;
    shapes
        .iter()
        .map(|dims| {
            let n: usize = dims.iter().product();
            let t = packed.narrow(0, start, n)?.reshape(*dims)?;
            start += n;
            Ok(t)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn exp_is_within_two_ulp() {
        let mut worst = 0f64;
        for i in 0..175_300 {
            let x = -87.0 + i as f32 * 1e-3; // up to 88.3
            let want = f64::from(x).exp();
            let rel = (f64::from(super::exp(x)) - want).abs() / want;
            worst = worst.max(rel);
        }
        assert!(worst < 2.5e-7, "worst relative error {worst:.3e}");
    }

    #[test]
    fn exp_special_values() {
        assert_eq!(super::exp(0.0), 1.0);
        assert_eq!(super::exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(super::exp(-88.1), 0.0);
        assert_eq!(super::exp(-1e30), 0.0);
        assert_eq!(super::exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(super::exp(100.0), f32::INFINITY);
        assert!(super::exp(f32::NAN).is_nan());
    }
}
