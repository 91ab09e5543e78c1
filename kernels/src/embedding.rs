//! Embedding lookup whose backward is a scatter-add of rows: dW[id] = Σ_{i: ids_i = id} dy_i.
//!
//! candle's `index_select` backward builds a zero (V, C) tensor and calls `index_add`; here the
//! CPU backward sorts token positions by id (a counting sort), then each vocabulary row sums its
//! own dy rows in position order: parallel over rows, no atomics, and the same result for any
//! thread count. On CUDA the rows are added with f32 atomics.

use crate::{out, run, slice, with_float, Elem, MultiOp};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use num_traits::Zero;
use rayon::prelude::*;

/// Rows of `weight` (V, C) picked by `ids` (any shape, u32): shape `ids.dims() + [C]`.
pub fn embedding(ids: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (_, c) = weight.dims2()?;
    let mut shape = ids.dims().to_vec();
    shape.push(c);
    let ids = ids.to_dtype(candle_core::DType::U32)?.flatten_all()?;
    weight
        .contiguous()?
        .apply_op2(&ids.contiguous()?, Embedding)?
        .reshape(shape)
}

struct Embedding;

fn out_shape(w: &Layout, ids: &Layout) -> Shape {
    (ids.shape().elem_count(), w.shape().dims()[1]).into()
}

impl CustomOp2 for Embedding {
    fn name(&self) -> &'static str {
        "kiln-embedding"
    }

    fn cpu_fwd(
        &self,
        w: &CpuStorage,
        lw: &Layout,
        ids: &CpuStorage,
        lids: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let v = lw.shape().dims()[0];
        if let Some(bad) = slice::<u32>((ids, lids))?
            .iter()
            .find(|&&i| i as usize >= v)
        {
            candle_core::bail!("embedding: id {bad} is out of range for {v} rows")
        }
        Ok((w.index_select(ids, lw, lids, 0)?, out_shape(lw, lids)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        w: &candle_core::CudaStorage,
        lw: &Layout,
        ids: &candle_core::CudaStorage,
        lids: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((w.index_select(ids, lw, lids, 0)?, out_shape(lw, lids)))
    }

    fn bwd(
        &self,
        w: &Tensor,
        ids: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let back = Backward { vocab: w.dim(0)? };
        Ok((run(&back, &[ids, dy])?.pop(), None))
    }
}

struct Backward {
    vocab: usize,
}

impl MultiOp for Backward {
    fn name(&self) -> &'static str {
        "kiln-embedding-backward"
    }
    fn cpu(&self, args: &[(&CpuStorage, &Layout)]) -> Result<Vec<(CpuStorage, Shape)>> {
        backward(args, self.vocab)
    }
    #[cfg(feature = "cuda")]
    fn cuda(
        &self,
        args: &[(&candle_core::CudaStorage, &Layout)],
    ) -> Result<Vec<(candle_core::CudaStorage, Shape)>> {
        crate::cuda::embedding::backward(args, self.vocab)
    }
}

/// ids (N), dy (N, C) → dW (vocab, C).
pub fn backward(args: &[(&CpuStorage, &Layout)], vocab: usize) -> Result<Vec<(CpuStorage, Shape)>> {
    let ids = slice::<u32>(args[0])?;
    let c = args[1].1.shape().dims()[1];
    // Positions grouped by id: positions[start[id]..start[id + 1]].
    let mut start = vec![0usize; vocab + 1];
    for &id in ids.iter().filter(|&&id| (id as usize) < vocab) {
        start[id as usize + 1] += 1;
    }
    for i in 0..vocab {
        start[i + 1] += start[i];
    }
    let mut fill = start.clone();
    let mut positions = vec![0usize; start[vocab]];
    for (pos, &id) in ids
        .iter()
        .enumerate()
        .filter(|(_, &id)| (id as usize) < vocab)
    {
        positions[fill[id as usize]] = pos;
        fill[id as usize] += 1;
    }
    with_float!(args[1].0, "embedding backward", |T| {
        type A = <T as Elem>::Acc;
        let dy = slice::<T>(args[1])?;
        let mut dw = crate::zeros::<T>(vocab * c);
        dw.par_chunks_mut(c).enumerate().for_each_init(
            || vec![A::zero(); c],
            |acc, (id, row)| {
                let rows = &positions[start[id]..start[id + 1]];
                if rows.is_empty() {
                    return;
                }
                acc.fill(Zero::zero());
                for &pos in rows {
                    for (a, d) in acc.iter_mut().zip(&dy[pos * c..][..c]) {
                        *a += d.acc();
                    }
                }
                for (r, a) in row.iter_mut().zip(acc.iter()) {
                    *r = T::from_acc(*a);
                }
            },
        );
        Ok(vec![out(dw, (vocab, c))])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference;
    use crate::testing::{check_grad, check_parity, rand};
    use candle_core::Device;

    #[test]
    fn matches_the_composition_and_finite_differences() {
        let ids = Tensor::new(&[[3u32, 1, 3], [0, 6, 3]], &Device::Cpu).unwrap();
        let w = rand(&[7, 5], 1);
        check_grad(&w, |w| embedding(&ids, w));
        check_parity(
            &[w, ids],
            1,
            |t| embedding(&t[1], &t[0]),
            |t| reference::embedding(&t[1], &t[0]),
        );
    }

    #[test]
    fn out_of_range_id_is_an_error() {
        let ids = Tensor::new(&[7u32], &Device::Cpu).unwrap();
        let err = embedding(&ids, &rand(&[7, 2], 1)).unwrap_err();
        assert!(err.to_string().contains("id 7 is out of range"), "{err}");
    }
}
