//! The wiring every fused op shares, so that an op file holds only its math.
//!
//! A [`Kernel`] is one entry point of the contract (README.md): a name and two plain functions,
//! the CPU one and the CUDA one, which take the arguments and a parameter `P` (eps, scale,
//! vocab…; `()` for none). [`Kernel::run`] runs one outside autograd (backward passes).
//! An [`Op`] is a differentiable op: its forward kernel, whose first output is the op's result
//! and whose other outputs are kept in a [`Saved`] for the backward, and its backward, which
//! turns the inputs, the output, its gradient and the kept tensors into the inputs' gradients.
//! [`Op::with`] makes it a candle `CustomOp1/2/3` (one generic [`Fused`] for all three).

use crate::profile::{timed, Pass};
use crate::{detached, Saved};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage,
    Tensor,
};
use std::sync::Arc;

/// A CPU entry point: arguments and parameter → outputs.
pub(crate) type CpuFn<P> = fn(&[(&CpuStorage, &Layout)], P) -> Result<Vec<(CpuStorage, Shape)>>;
/// A CUDA entry point, with the same arguments as its CPU twin.
#[cfg(feature = "cuda")]
pub(crate) type CudaFn<P> = fn(&[(&CudaStorage, &Layout)], P) -> Result<Vec<(CudaStorage, Shape)>>;

/// A kernel with several inputs and outputs (see the module docs).
pub(crate) struct Kernel<P> {
    pub name: &'static str,
    pub cpu: CpuFn<P>,
    #[cfg(feature = "cuda")]
    pub cuda: CudaFn<P>,
}

impl<P: Copy> Kernel<P> {
    fn on_cuda(
        &self,
        args: &[(&CudaStorage, &Layout)],
        param: P,
    ) -> Result<Vec<(CudaStorage, Shape)>> {
        #[cfg(feature = "cuda")]
        return (self.cuda)(args, param);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (args, param);
            candle_core::bail!("{}: built without the `cuda` feature", self.name)
        }
    }

    /// Runs the kernel on `inputs` (made contiguous) outside autograd, returning its outputs as
    /// new detached tensors.
    pub fn run(&self, param: P, inputs: &[&Tensor]) -> Result<Vec<Tensor>> {
        let inputs = inputs
            .iter()
            .map(|t| t.contiguous())
            .collect::<Result<Vec<_>>>()?;
        let guards: Vec<_> = inputs.iter().map(|t| t.storage_and_layout()).collect();
        let mut cpu = Vec::new();
        let mut gpu = Vec::new();
        for (s, l) in &guards {
            match &**s {
                Storage::Cpu(s) => cpu.push((s, *l)),
                Storage::Cuda(s) => gpu.push((s, *l)),
                _ => candle_core::bail!("{}: unsupported device", self.name),
            }
        }
        if !cpu.is_empty() && !gpu.is_empty() {
            candle_core::bail!("{}: inputs on different devices", self.name);
        }
        let outs: Vec<(Storage, Shape)> = if gpu.is_empty() {
            (self.cpu)(&cpu, param)?
                .into_iter()
                .map(|(s, sh)| (Storage::Cpu(s), sh))
                .collect()
        } else {
            self.on_cuda(&gpu, param)?
                .into_iter()
                .map(|(s, sh)| (Storage::Cuda(s), sh))
                .collect()
        };
        Ok(outs.into_iter().map(|(s, sh)| detached(s, sh)).collect())
    }
}

/// The CUDA entry point of a kernel that runs on the CPU only (its op takes another path on
/// other devices).
#[cfg(feature = "cuda")]
pub(crate) fn cpu_only<P>(
    _: &[(&CudaStorage, &Layout)],
    _: P,
) -> Result<Vec<(CudaStorage, Shape)>> {
    candle_core::bail!("kiln kernel: this kernel runs on the CPU only")
}

impl AsRef<Saved> for Saved {
    fn as_ref(&self) -> &Saved {
        self
    }
}

/// What an op's backward is given.
pub(crate) struct Grad<'a, P> {
    pub param: P,
    /// The op's inputs, in order.
    pub inputs: &'a [&'a Tensor],
    /// The op's output and its gradient.
    pub y: &'a Tensor,
    pub dy: &'a Tensor,
    /// The forward's outputs after the first.
    pub saved: &'a Saved,
}

/// A differentiable op (see the module docs).
pub(crate) struct Op<P: 'static> {
    pub forward: Kernel<P>,
    /// The gradients of the first inputs, in order; inputs past the end get none.
    pub backward: fn(Grad<'_, P>) -> Result<Vec<Tensor>>,
}

impl<P: Copy + Send + Sync + 'static> Op<P> {
    /// This op with parameter `param`, for `apply_op1/2/3`.
    pub fn with(&'static self, param: P) -> Fused<P> {
        Fused {
            op: self,
            param,
            saved: Saved::default(),
        }
    }

    /// [`Op::with`], keeping the forward's extra outputs in `saved`, which the caller reads too.
    pub fn sharing(&'static self, param: P, saved: Arc<Saved>) -> Fused<P, Arc<Saved>> {
        Fused {
            op: self,
            param,
            saved,
        }
    }
}

/// An [`Op`] applied once: the candle custom op in the graph, holding what its forward kept.
pub(crate) struct Fused<P: 'static, S = Saved> {
    op: &'static Op<P>,
    param: P,
    saved: S,
}

impl<P: Copy, S: AsRef<Saved>> Fused<P, S> {
    fn cpu(&self, args: &[(&CpuStorage, &Layout)]) -> Result<(CpuStorage, Shape)> {
        let name = self.op.forward.name;
        let out = timed(name, Pass::Forward, || {
            (self.op.forward.cpu)(args, self.param)
        })?;
        self.saved.as_ref().keep(out)
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self, args: &[(&CudaStorage, &Layout)]) -> Result<(CudaStorage, Shape)> {
        let name = self.op.forward.name;
        let out = timed(name, Pass::Forward, || {
            (self.op.forward.cuda)(args, self.param)
        })?;
        self.saved.as_ref().keep(out)
    }

    fn grads<const N: usize>(
        &self,
        inputs: [&Tensor; N],
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<[Option<Tensor>; N]> {
        let grad = Grad {
            param: self.param,
            inputs: &inputs,
            y,
            dy,
            saved: self.saved.as_ref(),
        };
        let name = self.op.forward.name;
        let mut g = timed(name, Pass::Backward, || (self.op.backward)(grad))?.into_iter();
        Ok(std::array::from_fn(|_| g.next()))
    }
}

impl<P: Copy, S: AsRef<Saved>> CustomOp1 for Fused<P, S> {
    fn name(&self) -> &'static str {
        self.op.forward.name
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu(&[(s, l)])
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        self.cuda(&[(s, l)])
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let [g] = self.grads([x], y, dy)?;
        Ok(g)
    }
}

impl<P: Copy, S: AsRef<Saved>> CustomOp2 for Fused<P, S> {
    fn name(&self) -> &'static str {
        self.op.forward.name
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu(&[(s1, l1), (s2, l2)])
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.cuda(&[(s1, l1), (s2, l2)])
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [ga, gb] = self.grads([a, b], y, dy)?;
        Ok((ga, gb))
    }
}

impl<P: Copy, S: AsRef<Saved>> CustomOp3 for Fused<P, S> {
    fn name(&self) -> &'static str {
        self.op.forward.name
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu(&[(s1, l1), (s2, l2), (s3, l3)])
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.cuda(&[(s1, l1), (s2, l2), (s3, l3)])
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [ga, gb, gc] = self.grads([a, b, c], y, dy)?;
        Ok((ga, gb, gc))
    }
}
