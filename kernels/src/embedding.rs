//! Embedding lookup whose backward is a scatter-add of rows: dW[id] = Σ_{i: ids_i = id} dy_i.
//!
//! candle's `index_select` backward builds a zero (V, C) tensor and calls `index_add`; here the
//! CPU backward sorts token positions by id (a counting sort), then each vocabulary row sums its
//! own dy rows in position order: parallel over rows, no atomics, and the same result for any
//! thread count. On CUDA the rows are added with f32 atomics.

use crate::{out, slice, with_float, Elem, Kernel, Op};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
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
        .apply_op2(&ids.contiguous()?, EMBEDDING.with(()))?
        .reshape(shape)
}

static EMBEDDING: Op<()> = Op {
    forward: Kernel {
        name: "kiln-embedding",
        cpu: |args, ()| forward(args),
        #[cfg(feature = "cuda")]
        cuda: |args, ()| select(args),
    },
    // dW; the ids get no gradient.
    backward: |g| BACKWARD.run(g.inputs[0].dim(0)?, &[g.inputs[1], g.dy]),
};

static BACKWARD: Kernel<usize> = Kernel {
    name: "kiln-embedding-backward",
    cpu: backward,
    #[cfg(feature = "cuda")]
    cuda: crate::cuda::embedding::backward,
};

/// w (V, C), ids (N) → w[ids] (N, C), on the CPU: ids out of range are an error.
fn forward(args: &[(&CpuStorage, &Layout)]) -> Result<Vec<(CpuStorage, Shape)>> {
    if let [(_, lw), ids] = args {
        let v = lw.shape().dims()[0];
        if let Some(bad) = slice::<u32>(*ids)?.iter().find(|&&i| i as usize >= v) {
            candle_core::bail!("embedding: id {bad} is out of range for {v} rows")
        }
    }
    select(args)
}

/// w (V, C), ids (N) → w[ids] (N, C): candle's `index_select`, on either device.
fn select<S: BackendStorage>(args: &[(&S, &Layout)]) -> Result<Vec<(S, Shape)>> {
    let [(w, lw), (ids, lids)] = args else {
        candle_core::bail!("embedding: expected 2 arguments (w, ids)")
    };
    let shape = Shape::from((lids.shape().elem_count(), lw.shape().dims()[1]));
    Ok(vec![(w.index_select(ids, lw, lids, 0)?, shape)])
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
