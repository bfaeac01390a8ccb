//! NCCL for a data-parallel group whose ranks all train on CUDA devices.
//!
//! The TCP ring still connects the ranks (it carries the vote, the NCCL unique id and the few
//! f64 sums of a step); gradients and parameters move through NCCL on the device's stream, in
//! order with every other kernel of the step.
//!
//! The unique id is made by rank 0: `ncclGetUniqueId` opens NCCL's bootstrap listener in the
//! calling process, so only a process of the group can make a usable id (the coordinator cannot
//! make it for them). Rank 0 sends it to the others over the ring.

use crate::comm::ring::Ring;
use anyhow::{Context, anyhow, bail};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::{DType, Device, Storage, Tensor};
use cudarc::nccl::{Comm, Id, ReduceOp};
use std::ops::Range;

/// A NCCL communicator over the ranks of a data-parallel group, on candle's stream.
pub struct NcclGroup {
    comm: Comm,
    device: CudaDevice,
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
        let comm = Comm::from_rank(cuda.cuda_stream(), rank, world, Id::uninit(bytes))
            .map_err(|e| anyhow!("ncclCommInitRank (rank {rank} of {world}): {:?}", e.0))?;
        Ok(NcclGroup { comm, device: cuda.clone(), rank, world, bytes_sent: 0 })
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
    /// (world - 1) chunks per reduce-scatter and per all-gather.
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent
    }

    /// Sums `flat` (f32 or bf16, `chunk * world` elements) over the ranks, in its dtype;
    /// returns this rank's chunk.
    pub fn reduce_scatter(&mut self, flat: &Tensor) -> anyhow::Result<Tensor> {
        let n = flat.elem_count();
        if !n.is_multiple_of(self.world) {
            bail!("reduce_scatter: expects a multiple of {} elements, got {n}", self.world);
        }
        let chunk = n / self.world;
        let flat = flat.contiguous()?;
        let (s, l) = flat.storage_and_layout();
        let Storage::Cuda(s) = &*s else { bail!("reduce_scatter: the tensor is not on CUDA") };
        let o = l.start_offset();
        let err = |e: cudarc::nccl::result::NcclError| {
            anyhow!("ncclReduceScatter ({n} values over {} ranks): {:?}", self.world, e.0)
        };
        let t = match flat.dtype() {
            DType::F32 => {
                let send = s.as_cuda_slice::<f32>()?.slice(o..o + n);
                let mut out = self.device.alloc_zeros::<f32>(chunk)?;
                self.comm.reduce_scatter(&send, &mut out, &ReduceOp::Sum).map_err(err)?;
                wrap(out, &self.device, chunk)
            }
            DType::BF16 => {
                let send = s.as_cuda_slice::<half::bf16>()?.slice(o..o + n);
                let mut out = self.device.alloc_zeros::<half::bf16>(chunk)?;
                self.comm.reduce_scatter(&send, &mut out, &ReduceOp::Sum).map_err(err)?;
                wrap(out, &self.device, chunk)
            }
            d => bail!("reduce_scatter: {d:?} is not supported (f32 or bf16)"),
        };
        self.bytes_sent += ((self.world - 1) * chunk * flat.dtype().size_in_bytes()) as u64;
        Ok(t)
    }

    /// Concatenates every rank's `shard` (same length and dtype on all: f32 or bf16), in rank order.
    pub fn all_gather(&mut self, shard: &Tensor) -> anyhow::Result<Tensor> {
        let shard = shard.contiguous()?;
        let c = shard.elem_count();
        let (s, l) = shard.storage_and_layout();
        let Storage::Cuda(s) = &*s else { bail!("all_gather: the tensor is not on CUDA") };
        let o = l.start_offset();
        let t = match shard.dtype() {
            DType::F32 => {
                let send = s.as_cuda_slice::<f32>()?.slice(o..o + c);
                let mut out = self.device.alloc_zeros::<f32>(c * self.world)?;
                self.comm.all_gather(&send, &mut out).map_err(|e| anyhow!("ncclAllGather: {:?}", e.0))?;
                wrap(out, &self.device, c * self.world)
            }
            DType::BF16 => {
                let send = s.as_cuda_slice::<half::bf16>()?.slice(o..o + c);
                let mut out = self.device.alloc_zeros::<half::bf16>(c * self.world)?;
                self.comm.all_gather(&send, &mut out).map_err(|e| anyhow!("ncclAllGather: {:?}", e.0))?;
                wrap(out, &self.device, c * self.world)
            }
            d => bail!("all_gather: {d:?} is not supported (f32 or bf16)"),
        };
        self.bytes_sent += ((self.world - 1) * c * shard.dtype().size_in_bytes()) as u64;
        Ok(t)
    }
}

fn wrap<T: candle_core::cuda_backend::CudaDType>(
    s: cudarc::driver::CudaSlice<T>,
    dev: &CudaDevice,
    n: usize,
) -> Tensor {
    let st = CudaStorage::wrap_cuda_slice(s, dev.clone());
    Tensor::from_storage(Storage::Cuda(st), n, candle_core::op::BackpropOp::none(), false)
}
