//! Elementwise ops: `add`, `scale`, `silu` and its backward, and `dropout`.
//!
//! silu(x) = x * sigmoid(x);  silu'(x) = sigmoid(x) * (1 + x * (1 - sigmoid(x))).
//! dropout(x; u, p) = x / (1 - p) where u >= p, else 0, for uniforms u in [0, 1) drawn once
//! per element; with the same u it is its own backward (dx = dropout(dy; u, p)).

use bytemuck::{Pod, Zeroable};

use super::check_same_shape;
use super::expf::sigmoid;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    scale: f32,
}

/// Checks the drop probability; returns the scale `1 / (1 - p)` of the kept elements.
fn dropout_scale(p: f32) -> Result<f32> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::invalid(
            "dropout",
            format!("the drop probability must be in [0, 1), got {p}"),
        ));
    }
    Ok(1.0 / (1.0 - p))
}

pub(crate) mod cpu {
    use rayon::prelude::*;

    use super::*;

    /// Below this many elements a loop beats spawning rayon tasks.
    const PAR_MIN: usize = 1 << 14;

    /// `f` applied to each element of `a` (and `b`), in parallel for large tensors.
    pub(crate) fn map2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
        if a.len() < PAR_MIN {
            a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect()
        } else {
            a.par_iter().zip(b).map(|(&x, &y)| f(x, y)).collect()
        }
    }

    pub(crate) fn map1(a: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
        if a.len() < PAR_MIN {
            a.iter().map(|&x| f(x)).collect()
        } else {
            a.par_iter().map(|&x| f(x)).collect()
        }
    }

    pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
        check_same_shape("add", a, b)?;
        let y = map2(&a.cpu_read("add")?, &b.cpu_read("add")?, |x, y| x + y);
        Ok(Tensor::from_cpu(a.shape(), y))
    }

    pub fn scale(x: &Tensor, s: f32) -> Result<Tensor> {
        let y = map1(&x.cpu_read("scale")?, |v| s * v);
        Ok(Tensor::from_cpu(x.shape(), y))
    }

    pub fn silu(x: &Tensor) -> Result<Tensor> {
        let y = map1(&x.cpu_read("silu")?, |v| v * sigmoid(v));
        Ok(Tensor::from_cpu(x.shape(), y))
    }

    pub fn silu_backward(x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        check_same_shape("silu_backward", x, dy)?;
        let dx = map2(
            &x.cpu_read("silu_backward")?,
            &dy.cpu_read("silu_backward")?,
            |v, g| {
                let s = sigmoid(v);
                g * s * (1.0 + v * (1.0 - s))
            },
        );
        Ok(Tensor::from_cpu(x.shape(), dx))
    }

    pub fn dropout(x: &Tensor, u: &Tensor, p: f32) -> Result<Tensor> {
        check_same_shape("dropout", x, u)?;
        let keep = dropout_scale(p)?;
        let y = map2(&x.cpu_read("dropout")?, &u.cpu_read("dropout")?, |v, u| {
            if u >= p {
                v * keep
            } else {
                0.0
            }
        });
        Ok(Tensor::from_cpu(x.shape(), y))
    }
}

pub(crate) mod gpu {
    use super::*;
    use crate::gpu::Access::{Read as R, ReadWrite as W};
    use crate::gpu::{Access, Arg, Gpu, Kernel};
    use crate::ops::{elementwise_grid, ELEMENTWISE_CONSTANTS};

    const SOURCE: &str = include_str!("../../shaders/elementwise.wgsl");

    const fn kernel(entry: &'static str, storage: &'static [Access]) -> Kernel {
        Kernel {
            shader: "elementwise",
            source: SOURCE,
            entry,
            params: size_of::<Params>(),
            storage,
            constants: ELEMENTWISE_CONSTANTS,
        }
    }

    const ADD: Kernel = kernel("add", &[R, R, W]);
    const SCALE: Kernel = kernel("scale", &[R, W]);
    const SILU: Kernel = kernel("silu", &[R, W]);
    const SILU_BACKWARD: Kernel = kernel("silu_backward", &[R, R, W]);
    const DROPOUT: Kernel = kernel("dropout", &[R, R, W]);
    pub(crate) const KERNELS: &[Kernel] = &[ADD, SCALE, SILU, SILU_BACKWARD, DROPOUT];

    /// One output, one or two inputs, one thread per element.
    fn run(g: &Gpu, kernel: &Kernel, inputs: &[&Tensor], scale: f32) -> Result<Tensor> {
        let op = kernel.entry;
        let n = inputs[0].numel();
        let out = g.alloc(op, n)?;
        let mut args: Vec<Arg> = Vec::with_capacity(3);
        for t in inputs {
            args.push(Arg::read(t.gpu_buffer(op)?));
        }
        args.push(Arg::write(&out));
        let params = Params { n: n as u32, scale };
        g.dispatch(kernel, &params, &args, elementwise_grid(n))?;
        Ok(Tensor::from_gpu(inputs[0].shape(), out))
    }

    pub fn add(g: &Gpu, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        check_same_shape("add", a, b)?;
        run(g, &ADD, &[a, b], 0.0)
    }

    pub fn scale(g: &Gpu, x: &Tensor, s: f32) -> Result<Tensor> {
        run(g, &SCALE, &[x], s)
    }

    pub fn silu(g: &Gpu, x: &Tensor) -> Result<Tensor> {
        run(g, &SILU, &[x], 0.0)
    }

    pub fn silu_backward(g: &Gpu, x: &Tensor, dy: &Tensor) -> Result<Tensor> {
        check_same_shape("silu_backward", x, dy)?;
        run(g, &SILU_BACKWARD, &[x, dy], 0.0)
    }

    /// The drop probability travels in the `scale` slot.
    pub fn dropout(g: &Gpu, x: &Tensor, u: &Tensor, p: f32) -> Result<Tensor> {
        check_same_shape("dropout", x, u)?;
        dropout_scale(p)?;
        run(g, &DROPOUT, &[x, u], p)
    }
}
