//! The all-reduce of data-parallel training over NCCL: one communicator per GPU of this process
//! (`ncclCommInitAll`), each on its candle device's stream, so the reduction is ordered after
//! the backward kernels that produced the gradients and before the optimiser's, with no host
//! copy of the gradients. A host-side gate (a one-value [`ThreadReducer`] round) runs first, so a
//! worker that failed before its reduction fails the others instead of leaving them waiting
//! inside NCCL.

use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, Device, Layout, Shape, Tensor};

use super::parallel::{Reducer, ThreadReducer};
use crate::error::{Error, Result};

/// A worker's NCCL communicator.
#[derive(Debug)]
pub struct NcclReducer {
    comm: Comm,
    gate: ThreadReducer,
}

// SAFETY: a communicator is used by one thread at a time: the reducer moves into the worker
// thread of each step and back, never shared. NCCL allows a communicator's calls from any host
// thread as long as they are not concurrent; the CUDA context is made current by the stream
// calls of cudarc.
#[allow(unsafe_code)]
unsafe impl Send for NcclReducer {}

impl NcclReducer {
    /// One reducer per device of `devices` (CUDA devices of this process, rank order).
    pub fn group(devices: &[Device]) -> Result<Vec<NcclReducer>> {
        let streams = devices
            .iter()
            .map(|d| match d {
                Device::Cuda(c) => Ok(c.cuda_stream()),
                other => Err(Error::Config(format!(
                    "NCCL reduces between CUDA devices, not {other:?}"
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        let comms = Comm::from_devices(streams)
            .map_err(|e| Error::Config(format!("NCCL: cannot set up the communicators: {e:?}")))?;
        Ok(comms
            .into_iter()
            .zip(ThreadReducer::group(devices.len()))
            .map(|(comm, gate)| NcclReducer { comm, gate })
            .collect())
    }
}

/// candle's op around `ncclAllReduce(sum)`: a new buffer on the input's device.
struct AllReduce<'a>(&'a Comm);

impl candle_core::CustomOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL reduces CUDA tensors")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let n = l.shape().elem_count();
        let src = s.as_cuda_slice::<f32>()?;
        let src = match l.contiguous_offsets() {
            Some((0, end)) if end == src.len() => src,
            _ => candle_core::bail!("the all-reduce buffer must be contiguous from offset 0"),
        };
        let dev = s.device.clone();
        let mut dst = dev.alloc_zeros::<f32>(n)?;
        self.0
            .all_reduce(src, &mut dst, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce: {e:?}")))?;
        Ok((CudaStorage::wrap_cuda_slice(dst, dev), l.shape().clone()))
    }
}

impl Reducer for NcclReducer {
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn world(&self) -> usize {
        self.comm.world_size()
    }
    fn all_reduce_sum(&mut self, flat: &Tensor) -> Result<Tensor> {
        self.gate
            .all_reduce_sum(&Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu)?)?;
        let flat = flat.contiguous()?;
        Ok(flat.apply_op1_no_bwd(&AllReduce(&self.comm))?)
    }
    fn abort(&mut self) {
        self.gate.abort();
    }
}
