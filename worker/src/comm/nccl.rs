//! NCCL for a data-parallel group whose ranks all train on CUDA devices.
//!
//! The TCP ring still connects the ranks (it carries the vote and the NCCL unique id); gradients
//! and parameters move through NCCL on a stream of its own, ordered against the compute stream
//! with events, so a bucket's all-reduce runs while the backward pass computes the next one.
//!
//! The unique id is made by rank 0: `ncclGetUniqueId` opens NCCL's bootstrap listener in the
//! calling process, so only a process of the group can make a usable id (the coordinator cannot
//! make it for them). Rank 0 sends it to the others over the ring.

use crate::comm::ring::Ring;
use anyhow::{Context, anyhow, bail};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::{DType, Device, Layout, Storage, Tensor};
use cudarc::driver::CudaStream;
use cudarc::nccl::{Comm, Id, ReduceOp};
use std::ops::Range;
use std::sync::Arc;

/// A NCCL communicator over the ranks of a data-parallel group, on a stream of its own.
pub struct NcclGroup {
    comm: Comm,
    device: CudaDevice,
    /// The stream the collectives run on, ordered against the compute stream by events.
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
    bytes_sent: u64,
}

impl std::fmt::Debug for NcclGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclGroup(rank {} of {})", self.rank, self.world)
    }
}

/// Whether the ring's ranks can form a NCCL group: all on CUDA devices, no two on the same one
/// (NCCL refuses that; two local workers sharing one GPU keep the TCP ring). Every rank sends
/// its vote and its GPU's UUID; all get the same answer. `Err` says why not, for the log.
pub fn usable(ring: &mut Ring, device: &Device) -> anyhow::Result<Result<(), String>> {
    let (rank, world) = (ring.rank(), ring.world());
    // [votes, then 4 words of 32 bits of each rank's UUID]: exact as f64, zero where not ours.
    let mut mine = vec![0f64; 1 + 4 * world];
    if let Device::Cuda(d) = device {
        let uuid = d.cuda_stream().context().uuid().map_err(|e| anyhow!("cuDeviceGetUuid: {e:?}"))?;
        let b: Vec<u8> = uuid.bytes.iter().map(|c| *c as u8).collect();
        mine[0] = 1.0;
        for (k, w) in b.chunks_exact(4).enumerate() {
            mine[1 + 4 * rank + k] = f64::from(u32::from_le_bytes(w.try_into().expect("4 bytes")));
        }
    }
    let all = ring.all_reduce_small(&mine)?;
    if all[0] != world as f64 {
        return Ok(Err(format!("{} of {world} ranks train on CUDA", all[0])));
    }
    let ids: Vec<&[f64]> = (0..world).map(|r| &all[1 + 4 * r..5 + 4 * r]).collect();
    for a in 0..world {
        for b in a + 1..world {
            if ids[a] == ids[b] {
                return Ok(Err(format!("ranks {a} and {b} share one GPU")));
            }
        }
    }
    Ok(Ok(()))
}

impl NcclGroup {
    /// Joins the group of the ring's ranks on `device` (collective: every rank calls it).
    pub fn connect(ring: &mut Ring, device: &Device) -> anyhow::Result<NcclGroup> {
        let Device::Cuda(cuda) = device else { bail!("NCCL needs a CUDA device, this rank has {device:?}") };
        let (rank, world) = (ring.rank(), ring.world());
        // The id's 128 bytes travel as one f64 per byte: the others add zeros, so the sum is exact.
        let mine: Vec<f64> = if rank == 0 {
            let id = Id::new().map_err(|e| anyhow!("ncclGetUniqueId: {:?}", e.0))?;
            id.internal().iter().map(|b| f64::from(*b as u8)).collect()
        } else {
            vec![0.0; 128]
        };
        let got = ring.all_reduce_small(&mine).context("sending the NCCL unique id")?;
        let mut bytes = [0 as std::ffi::c_char; 128];
        for (b, v) in bytes.iter_mut().zip(&got) {
            *b = *v as u8 as std::ffi::c_char;
        }
        let stream =
            cuda.cuda_stream().context().new_stream().map_err(|e| anyhow!("creating a stream for NCCL: {e:?}"))?;
        let comm = Comm::from_rank(stream.clone(), rank, world, Id::uninit(bytes))
            .map_err(|e| anyhow!("ncclCommInitRank (rank {rank} of {world}): {:?}", e.0))?;
        Ok(NcclGroup { comm, device: cuda.clone(), stream, rank, world, bytes_sent: 0 })
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Elements per rank of a `len`-element vector: NCCL's reduce-scatter and all-gather need
    /// equal chunks, so the vector is padded to `chunk * world`.
    pub fn chunk(&self, len: usize) -> usize {
        len.div_ceil(self.world)
    }

    /// The elements of a `len`-element vector this rank owns (the last rank's may be shorter).
    pub fn own_range(&self, len: usize) -> Range<usize> {
        let c = self.chunk(len);
        (self.rank * c).min(len)..((self.rank + 1) * c).min(len)
    }

    /// Bytes this rank has put on the wire, counted as NCCL's ring algorithm sends them:
    /// 2 (world - 1) chunks per all-reduce and (world - 1) per all-gather.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    /// Sums `flat[range]` over the ranks, in place, on the group's stream: it starts once the
    /// work queued so far on the compute stream is done (the gradients copied in) and runs
    /// alongside what is queued after it (the rest of the backward pass). Call
    /// [`NcclGroup::join`] before the compute stream reads the result.
    pub fn all_reduce(&mut self, flat: &Tensor, range: Range<usize>) -> anyhow::Result<()> {
        if range.end > flat.elem_count() || !flat.is_contiguous() || flat.rank() != 1 {
            bail!("all_reduce: {range:?} of a {:?} tensor (a contiguous vector is needed)", flat.dims());
        }
        self.stream.join(self.device.cuda_stream().as_ref()).map_err(|e| anyhow!("ordering the streams: {e:?}"))?;
        let n = range.len();
        flat.inplace_op1(&AllReduce { comm: &self.comm, range })?;
        self.bytes_sent += (2 * (self.world - 1) * n.div_ceil(self.world) * flat.dtype().size_in_bytes()) as u64;
        Ok(())
    }

    /// Writes every rank's `shard` (same length and dtype on all) into `flat`, in rank order, on
    /// the group's stream after the compute stream's queued work (`flat` holds `world` shards).
    pub fn all_gather_into(&mut self, shard: &Tensor, flat: &Tensor) -> anyhow::Result<()> {
        let c = shard.elem_count();
        if flat.elem_count() != c * self.world || !flat.is_contiguous() || !shard.is_contiguous() {
            bail!("all_gather_into: {} ranks of {c} do not fill a {:?} buffer", self.world, flat.dims());
        }
        if shard.dtype() != flat.dtype() {
            bail!("all_gather_into: shard is {:?}, buffer {:?}", shard.dtype(), flat.dtype());
        }
        self.stream.join(self.device.cuda_stream().as_ref()).map_err(|e| anyhow!("ordering the streams: {e:?}"))?;
        flat.inplace_op1(&AllGather { comm: &self.comm, shard })?;
        self.bytes_sent += ((self.world - 1) * c * shard.dtype().size_in_bytes()) as u64;
        Ok(())
    }

    /// Makes the compute stream wait for everything queued on the group's stream (no host wait).
    pub fn join(&self) -> anyhow::Result<()> {
        self.device.cuda_stream().join(&self.stream).map_err(|e| anyhow!("ordering the streams: {e:?}"))
    }

    /// Blocks the host until the group's queued collectives are done (for timing).
    pub fn synchronize(&self) -> anyhow::Result<()> {
        self.stream.synchronize().map_err(|e| anyhow!("waiting for NCCL: {e:?}"))
    }
}

/// `ncclAllReduce` (sum) in place over a range of a tensor's storage.
struct AllReduce<'a> {
    comm: &'a Comm,
    range: Range<usize>,
}

impl candle_core::InplaceOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("NCCL all-reduce needs a CUDA tensor")
    }

    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
        let r = l.start_offset() + self.range.start..l.start_offset() + self.range.end;
        let err = |e: cudarc::nccl::result::NcclError| candle_core::Error::Msg(format!("ncclAllReduce: {:?}", e.0));
        match s.dtype() {
            DType::F32 => self
                .comm
                .all_reduce_in_place(&mut s.as_cuda_slice_mut::<f32>()?.slice_mut(r), &ReduceOp::Sum)
                .map_err(err)?,
            DType::BF16 => self
                .comm
                .all_reduce_in_place(&mut s.as_cuda_slice_mut::<half::bf16>()?.slice_mut(r), &ReduceOp::Sum)
                .map_err(err)?,
            d => candle_core::bail!("NCCL all-reduce: {d:?} is not supported (f32 or bf16)"),
        };
        Ok(())
    }
}

/// `ncclAllGather` of a shard into a tensor's storage.
struct AllGather<'a> {
    comm: &'a Comm,
    shard: &'a Tensor,
}

impl candle_core::InplaceOp1 for AllGather<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-gather"
    }

    fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("NCCL all-gather needs a CUDA tensor")
    }

    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
        let (src, sl) = self.shard.storage_and_layout();
        let Storage::Cuda(src) = &*src else { candle_core::bail!("NCCL all-gather: the shard is not on CUDA") };
        let (c, so) = (self.shard.elem_count(), sl.start_offset());
        let r = l.start_offset()..l.start_offset() + l.shape().elem_count();
        let err = |e: cudarc::nccl::result::NcclError| candle_core::Error::Msg(format!("ncclAllGather: {:?}", e.0));
        match s.dtype() {
            DType::F32 => self
                .comm
                .all_gather(
                    &src.as_cuda_slice::<f32>()?.slice(so..so + c),
                    &mut s.as_cuda_slice_mut::<f32>()?.slice_mut(r),
                )
                .map_err(err)?,
            DType::BF16 => self
                .comm
                .all_gather(
                    &src.as_cuda_slice::<half::bf16>()?.slice(so..so + c),
                    &mut s.as_cuda_slice_mut::<half::bf16>()?.slice_mut(r),
                )
                .map_err(err)?,
            d => candle_core::bail!("NCCL all-gather: {d:?} is not supported (f32 or bf16)"),
        };
        Ok(())
    }
}
