//! In-place updates that let the chunked LM-head cross-entropy keep one weight-gradient buffer:
//! `acc += aᵀ · b` (a product accumulated into a view), `acc += x` and `t *= g` (`g` a
//! one-element tensor read on the device, so scaling by a loss weight needs no host sync). Math
//! in f32, one rounding per element (on the CPU the product is rounded once more, before the add).

use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor};

use crate::cpu::{Elem, ld, st};
use crate::error::{KernelError, contiguous_range, expect_contiguous, expect_float, expect_same_dtype};

const ADD: &str = "add_into";
const SCALE: &str = "scale_by";
const GEMM: &str = "add_matmul_tn";
const ROWS: &str = "add_rows_into";

/// `acc[ids[i]] += x[i]` for every row `i` of `x`, in place: `acc` `[n, d]` (f32, bf16 or f16 on
/// the CPU, f32 or bf16 on CUDA; contiguous, it may be a narrowed view), `x` `[ids.len(), d]` in
/// f32, `ids` distinct and below `n`. Math in f32, one rounding per element. Distinct ids mean no
/// two rows land on one, so the result does not depend on the order (no atomics), and only the
/// named rows are touched: a sparse gradient joins a dense one without a dense temporary.
pub fn add_rows_into(acc: &Tensor, ids: &[u32], x: &Tensor) -> Result<()> {
    expect_float(ROWS, "acc", acc)?;
    expect_contiguous(ROWS, "acc", acc)?;
    let shape_err =
        |what, t: &Tensor, expected: String| KernelError::Shape { op: ROWS, what, got: t.dims().to_vec(), expected };
    let (n, d) = acc.dims2().map_err(|_| shape_err("acc", acc, "[n, d]".to_string()))?;
    if x.dims() != [ids.len(), d] {
        return Err(shape_err("x", x, format!("[{}, {d}] (a row per id, d = columns of acc)", ids.len())).into());
    }
    if x.dtype() != DType::F32 {
        return Err(KernelError::DTypeMismatch {
            op: ROWS,
            what: "x",
            other: "f32",
            got: x.dtype(),
            expected: DType::F32,
        }
        .into());
    }
    let mut sorted = ids.to_vec();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(shape_err("ids", x, format!("distinct ids (id {} appears twice; sum its rows first)", w[0])).into());
    }
    if let Some(&last) = sorted.last().filter(|&&l| l as usize >= n) {
        return Err(shape_err("ids", acc, format!("ids below {n} (got {last})")).into());
    }
    if ids.is_empty() {
        return Ok(());
    }
    let ids_t = Tensor::from_slice(ids, ids.len(), acc.device())?;
    acc.inplace_op3(&ids_t, &x.contiguous()?, &AddRowsInto { d })
}

/// `acc += aᵀ · b`, in place: `acc` `[m, n]` (contiguous; it may be a narrowed view of a larger
/// buffer), `a` `[k, m]`, `b` `[k, n]`, all of one dtype (f32 or bf16 on CUDA; f32, bf16 or f16
/// on the CPU).
///
/// On CUDA this is one cuBLAS GEMM that accumulates straight into `acc` (beta = 1, f32
/// accumulation), so no `[m, n]` temporary exists. On the CPU the product is formed `block` rows
/// of `acc` at a time and added with [`add_into`]: the temporary stays at `block × n` values.
pub fn add_matmul_tn(acc: &Tensor, a: &Tensor, b: &Tensor, block: usize) -> Result<()> {
    expect_float(GEMM, "acc", acc)?;
    expect_same_dtype(GEMM, "a", a, "acc", acc)?;
    expect_same_dtype(GEMM, "b", b, "acc", acc)?;
    let shape_err =
        |what, t: &Tensor, expected: String| KernelError::Shape { op: GEMM, what, got: t.dims().to_vec(), expected };
    let (m, n) = acc.dims2().map_err(|_| shape_err("acc", acc, "[m, n]".to_string()))?;
    let (k, am) = a.dims2().map_err(|_| shape_err("a", a, format!("[k, {m}]")))?;
    if am != m {
        return Err(shape_err("a", a, format!("[k, {m}] (m = rows of acc)")).into());
    }
    if b.dims() != [k, n] {
        return Err(shape_err("b", b, format!("[{k}, {n}] (k = rows of a, n = columns of acc)")).into());
    }
    expect_contiguous(GEMM, "acc", acc)?;
    if block == 0 {
        return Err(shape_err("block", acc, "a block of at least one row".to_string()).into());
    }
    if acc.device().is_cuda() {
        return acc.inplace_op3(&a.contiguous()?, &b.contiguous()?, &AddMatmulTn { dims: (k, m, n) });
    }
    for m0 in (0..m).step_by(block) {
        let mb = block.min(m - m0);
        let part = a.narrow(1, m0, mb)?.contiguous()?;
        add_into(&acc.narrow(0, m0, mb)?, &part.t()?.matmul(b)?)?;
    }
    Ok(())
}

/// `acc += x`, in place. Same shape and dtype (f32, bf16 or f16); `acc` must be contiguous
/// (it may be a narrowed view of a larger buffer), `x` is made contiguous.
pub fn add_into(acc: &Tensor, x: &Tensor) -> Result<()> {
    expect_float(ADD, "acc", acc)?;
    expect_same_dtype(ADD, "x", x, "acc", acc)?;
    if acc.dims() != x.dims() {
        return Err(KernelError::Shape {
            op: ADD,
            what: "x",
            got: x.dims().to_vec(),
            expected: format!("{:?} (the shape of acc)", acc.dims()),
        }
        .into());
    }
    expect_contiguous(ADD, "acc", acc)?;
    acc.inplace_op2(&x.contiguous()?, &AddInto)
}

/// `t *= g`, in place, with `g` a one-element tensor of any float dtype (converted to f32 on its
/// device). `t` must be contiguous.
pub fn scale_by(t: &Tensor, g: &Tensor) -> Result<()> {
    expect_float(SCALE, "t", t)?;
    if g.elem_count() != 1 {
        return Err(KernelError::Shape {
            op: SCALE,
            what: "g",
            got: g.dims().to_vec(),
            expected: "one element".to_string(),
        }
        .into());
    }
    expect_contiguous(SCALE, "t", t)?;
    t.inplace_op2(&g.to_dtype(DType::F32)?.flatten_all()?.contiguous()?, &ScaleBy)
}

fn add_slices<T: Elem>(acc: &mut [T], x: &[T]) {
    crate::cpu::for_elem_chunks(acc, |r, out| {
        for (o, &v) in out.iter_mut().zip(&x[r]) {
            *o = st(ld(*o) + ld(v));
        }
    });
}

fn scale_slice<T: Elem>(t: &mut [T], g: f32) {
    crate::cpu::for_elem_chunks(t, |_, out| {
        for o in out.iter_mut() {
            *o = st(ld(*o) * g);
        }
    });
}

struct AddInto;

impl InplaceOp2 for AddInto {
    fn name(&self) -> &'static str {
        ADD
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let (r1, r2) = (contiguous_range(ADD, "acc", l1)?, contiguous_range(ADD, "x", l2)?);
        match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(x)) => add_slices(&mut a[r1], &x[r2]),
            (CpuStorage::BF16(a), CpuStorage::BF16(x)) => add_slices(&mut a[r1], &x[r2]),
            (CpuStorage::F16(a), CpuStorage::F16(x)) => add_slices(&mut a[r1], &x[r2]),
            (a, x) => return Err(crate::cpu::dtype_error(ADD, &[&*a, x])),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        crate::cuda::add_into((s1, l1), (s2, l2))
    }
}

struct ScaleBy;

impl InplaceOp2 for ScaleBy {
    fn name(&self) -> &'static str {
        SCALE
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let r1 = contiguous_range(SCALE, "t", l1)?;
        let g = s2.as_slice::<f32>()?[l2.start_offset()];
        match s1 {
            CpuStorage::F32(t) => scale_slice(&mut t[r1], g),
            CpuStorage::BF16(t) => scale_slice(&mut t[r1], g),
            CpuStorage::F16(t) => scale_slice(&mut t[r1], g),
            t => return Err(crate::cpu::dtype_error(SCALE, &[&*t])),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        crate::cuda::scale_by((s1, l1), (s2, l2))
    }
}

/// The CUDA side of [`add_matmul_tn`]; CPU tensors take the blocked path there and never reach
/// this op.
struct AddMatmulTn {
    /// `(k, m, n)`: the shapes checked by `add_matmul_tn`.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    dims: (usize, usize, usize),
}

impl InplaceOp3 for AddMatmulTn {
    fn name(&self) -> &'static str {
        GEMM
    }

    fn cpu_fwd(
        &self,
        _: &mut CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<()> {
        candle_core::bail!("{GEMM}: CPU tensors are multiplied in blocks by `add_matmul_tn` itself; this is a bug")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        crate::cuda::add_matmul_tn((s1, l1), (s2, l2), (s3, l3), self.dims)
    }
}

struct AddRowsInto {
    d: usize,
}

fn add_rows<T: Elem>(acc: &mut [T], ids: &[u32], x: &[f32], d: usize) {
    for (i, &id) in ids.iter().enumerate() {
        let row = &mut acc[id as usize * d..(id as usize + 1) * d];
        for (a, &v) in row.iter_mut().zip(&x[i * d..(i + 1) * d]) {
            *a = st(ld(*a) + v);
        }
    }
}

impl InplaceOp3 for AddRowsInto {
    fn name(&self) -> &'static str {
        ROWS
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let r1 = contiguous_range(ROWS, "acc", l1)?;
        let ids = &s2.as_slice::<u32>()?[contiguous_range(ROWS, "ids", l2)?];
        let x = &s3.as_slice::<f32>()?[contiguous_range(ROWS, "x", l3)?];
        match s1 {
            CpuStorage::F32(a) => add_rows(&mut a[r1], ids, x, self.d),
            CpuStorage::BF16(a) => add_rows(&mut a[r1], ids, x, self.d),
            CpuStorage::F16(a) => add_rows(&mut a[r1], ids, x, self.d),
            a => return Err(crate::cpu::dtype_error(ROWS, &[&*a])),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        crate::cuda::add_rows_into((s1, l1), (s2, l2), (s3, l3), self.d)
    }
}
