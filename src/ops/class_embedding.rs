//! The class embedding of a class-conditional U-Net (`nn.Embedding` in diffusers'
//! `UNet2DModel` with `num_class_embeds`): a table of one row per class, looked up by label.
//!
//!   y[b, :] = W[l_b, :]                          (W: [K, D], labels l_b < K)
//!   dW[k, :] = sum_{b : l_b = k} dy[b, :]        (summed in batch order)
//!
//! The labels are host integers; the GPU gets them as a small `u32` buffer. Both backends add
//! the rows of `dy` in batch order, so the table's gradient is the same to the bit on both.

use bytemuck::{Pod, Zeroable};

use super::check_rank;
use super::grads::Partials;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

/// The uniform block of `shaders/class_embedding.wgsl`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    /// Labels, the batch size `B`.
    batch: u32,
    /// Classes `K`, the rows of the table.
    classes: u32,
    /// Width `D` of a row.
    dim: u32,
    /// Where the table's gradient starts in the arena.
    offset: u32,
    /// Parts of the gradient in the arena (all but the first are cleared).
    splits: u32,
}

/// Checks `table [K, D]` and that every label names a row; returns `(K, D)`.
fn check_forward(op: &'static str, table: &Tensor, labels: &[u32]) -> Result<(usize, usize)> {
    check_rank(op, "table", table, 2)?;
    let (classes, dim) = (table.shape()[0], table.shape()[1]);
    check_labels(op, labels, classes)?;
    if dim == 0 {
        return Err(Error::invalid(op, "the table's rows are empty"));
    }
    Ok((classes, dim))
}

/// A batch of labels, each a class id below `classes`.
fn check_labels(op: &'static str, labels: &[u32], classes: usize) -> Result<()> {
    if labels.is_empty() {
        return Err(Error::invalid(
            op,
            "no labels given; a batch has at least one",
        ));
    }
    match labels.iter().find(|&&l| l as usize >= classes) {
        Some(l) => Err(Error::invalid(
            op,
            format!("label {l} is out of range for a table of {classes} classes (0..{classes})"),
        )),
        None => Ok(()),
    }
}

/// Checks `dy [B, D]` against the labels and the parts `dw` of a `[K, D]` gradient; returns D.
fn check_backward(
    op: &'static str,
    labels: &[u32],
    dy: &Tensor,
    classes: usize,
    dw: &Partials,
) -> Result<usize> {
    check_rank(op, "dy", dy, 2)?;
    if dy.shape()[0] != labels.len() {
        return Err(Error::shape(
            op,
            format!("dy with one row per label ({})", labels.len()),
            dy.shape(),
        ));
    }
    check_labels(op, labels, classes)?;
    let dim = dy.shape()[1];
    if dim == 0 {
        return Err(Error::invalid(op, "the table's rows are empty"));
    }
    dw.check(op, classes * dim)?;
    Ok(dim)
}

pub(crate) mod cpu {
    use super::*;

    pub fn embedding(table: &Tensor, labels: &[u32]) -> Result<Tensor> {
        const OP: &str = "embedding";
        let (_, dim) = check_forward(OP, table, labels)?;
        let w = table.cpu_read(OP)?;
        let mut y = Vec::with_capacity(labels.len() * dim);
        for &l in labels {
            y.extend_from_slice(&w[l as usize * dim..][..dim]);
        }
        Ok(Tensor::from_cpu(&[labels.len(), dim], y))
    }

    /// The gradient whole as the first part of `dw`, zeros as the others.
    pub fn embedding_backward_into(
        labels: &[u32],
        dy: &Tensor,
        classes: usize,
        dw: &Partials,
    ) -> Result<()> {
        const OP: &str = "embedding_backward";
        let dim = check_backward(OP, labels, dy, classes, dw)?;
        let d = dy.cpu_read(OP)?;
        let mut arena = dw.arena.clone();
        let mut a = arena.cpu_write(OP)?;
        let out = &mut a[dw.offset..dw.offset + dw.splits * classes * dim];
        out.fill(0.0);
        for (b, &l) in labels.iter().enumerate() {
            let row = &mut out[l as usize * dim..][..dim];
            row.iter_mut()
                .zip(&d[b * dim..][..dim])
                .for_each(|(o, &g)| *o += g);
        }
        Ok(())
    }
}

pub(crate) mod gpu {
    use super::*;
    use crate::gpu::Access::{Read as R, ReadWrite as W};
    use crate::gpu::{Access, Arg, Gpu, Kernel};
    use crate::ops::{elementwise_grid, ELEMENTWISE_CONSTANTS};

    const SOURCE: &str = include_str!("../../shaders/class_embedding.wgsl");

    const fn kernel(entry: &'static str, storage: &'static [Access]) -> Kernel {
        Kernel {
            shader: "class_embedding",
            source: SOURCE,
            entry,
            params: size_of::<Params>(),
            storage,
            constants: ELEMENTWISE_CONSTANTS,
        }
    }

    const EMBEDDING: Kernel = kernel("embedding", &[R, R, W]);
    const EMBEDDING_BACKWARD: Kernel = kernel("embedding_backward", &[R, R, W]);
    pub(crate) const KERNELS: &[Kernel] = &[EMBEDDING, EMBEDDING_BACKWARD];

    /// The labels as a buffer of `u32` words (the shader reads them as such).
    fn upload_labels(g: &Gpu, labels: &[u32]) -> Result<Tensor> {
        let words: Vec<f32> = labels.iter().map(|&l| f32::from_bits(l)).collect();
        g.upload(&[words.len()], &words)
    }

    /// Every index the kernels form must fit in u32.
    fn check_u32(op: &'static str, elements: usize) -> Result<u32> {
        u32::try_from(elements)
            .map_err(|_| Error::invalid(op, format!("{elements} elements exceed 2^32")))
    }

    fn params(labels: &[u32], classes: usize, dim: usize, parts: Option<&Partials>) -> Params {
        Params {
            batch: labels.len() as u32,
            classes: classes as u32,
            dim: dim as u32,
            offset: parts.map_or(0, |p| p.offset as u32),
            splits: parts.map_or(0, |p| p.splits as u32),
        }
    }

    /// One invocation per element of `y`.
    pub fn embedding(g: &Gpu, table: &Tensor, labels: &[u32]) -> Result<Tensor> {
        const OP: &str = "embedding";
        let (classes, dim) = check_forward(OP, table, labels)?;
        let n = labels.len() * dim;
        check_u32(OP, n.max(classes * dim))?;
        let y = g.alloc(OP, n)?;
        let l = upload_labels(g, labels)?;
        let args = [
            Arg::read(l.gpu_buffer(OP)?),
            Arg::read(table.gpu_buffer(OP)?),
            Arg::write(&y),
        ];
        g.dispatch(
            &EMBEDDING,
            &params(labels, classes, dim, None),
            &args,
            elementwise_grid(n),
        )?;
        Ok(Tensor::from_gpu(&[labels.len(), dim], y))
    }

    /// One invocation per value of every part: part 0's values loop over the batch, the
    /// others are zeros.
    pub fn embedding_backward_into(
        g: &Gpu,
        labels: &[u32],
        dy: &Tensor,
        classes: usize,
        dw: &Partials,
    ) -> Result<()> {
        const OP: &str = "embedding_backward";
        let dim = check_backward(OP, labels, dy, classes, dw)?;
        let n = dw.splits * classes * dim;
        check_u32(OP, dw.offset + n)?;
        let l = upload_labels(g, labels)?;
        let args = [
            Arg::read(l.gpu_buffer(OP)?),
            Arg::read(dy.gpu_buffer(OP)?),
            Arg::write(dw.arena.gpu_buffer(OP)?),
        ];
        let p = params(labels, classes, dim, Some(dw));
        g.dispatch(&EMBEDDING_BACKWARD, &p, &args, elementwise_grid(n))
    }
}
