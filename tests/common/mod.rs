//! Shared test helpers: seeded inputs, closeness checks, CPU-vs-GPU parity, finite
//! differences, and the harness that hands GPU tests their adapter (`harness.rs`).
#![allow(dead_code)]

pub mod harness;

use std::collections::HashMap;
use std::path::Path;

use diffwgpu::autodiff::Tape;
use diffwgpu::nn::UNet2D;
use diffwgpu::{Backend, Cpu, Gpu, Tensor};

/// Deterministic pseudo-random values in [-1, 1) (splitmix64), independent of the library's
/// own generator so that tests do not depend on the code they check.
pub fn seeded(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Asserts `|got - want| <= atol + rtol * |want|` elementwise, reporting the worst element.
pub fn assert_close(name: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(
        got.len(),
        want.len(),
        "{name}: length {} vs {}",
        got.len(),
        want.len()
    );
    let mut worst = (0usize, 0.0f32);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.is_finite() == w.is_finite(),
            "{name}[{i}]: got {g}, want {w}"
        );
        let excess = (g - w).abs() - (atol + rtol * w.abs());
        if excess > worst.1 || excess.is_nan() {
            worst = (i, excess);
        }
    }
    let (i, excess) = worst;
    assert!(
        excess <= 0.0,
        "{name}: element {i} got {} want {} (|diff| {} > atol {atol} + rtol {rtol} * |want|)",
        got[i],
        want[i],
        (got[i] - want[i]).abs()
    );
}

/// Uploads `data` with `shape` to backend `b`.
pub fn up(b: &dyn Backend, shape: &[usize], data: &[f32]) -> Tensor {
    b.upload(shape, data).expect("upload")
}

/// Reads a tensor back.
pub fn down(b: &dyn Backend, t: &Tensor) -> Vec<f32> {
    b.to_vec(t).expect("to_vec")
}

/// Runs `f` on the CPU and on the GPU and compares every named output.
/// `f` returns (name, values) pairs; the tolerance is `atol + rtol * |cpu|`.
pub fn parity(
    g: &Gpu,
    case: &str,
    atol: f32,
    rtol: f32,
    f: impl Fn(&dyn Backend) -> Vec<(&'static str, Vec<f32>)>,
) {
    let want = f(&Cpu);
    let got = f(g);
    assert_eq!(want.len(), got.len());
    for ((name, w), (_, gv)) in want.iter().zip(&got) {
        assert_close(&format!("{case}: {name}"), gv, w, atol, rtol);
    }
}

/// Central finite differences of the scalar `loss` at `x`, compared with `analytic`
/// (the gradient the backward pass gave) on every element: `|fd - an| <= atol + rtol |fd|`.
/// Computed in f32 with step `h`; pick `h` around 1e-2 for losses of O(1).
pub fn gradcheck(
    name: &str,
    x: &[f32],
    analytic: &[f32],
    h: f32,
    atol: f32,
    rtol: f32,
    loss: impl Fn(&[f32]) -> f64,
) {
    assert_eq!(x.len(), analytic.len(), "{name}: gradient length");
    let mut xp = x.to_vec();
    let mut fd = Vec::with_capacity(x.len());
    for i in 0..x.len() {
        let orig = xp[i];
        xp[i] = orig + h;
        let up = loss(&xp);
        xp[i] = orig - h;
        let dn = loss(&xp);
        xp[i] = orig;
        fd.push(((up - dn) / (2.0 * h as f64)) as f32);
    }
    assert_close(&format!("gradcheck {name}"), analytic, &fd, atol, rtol);
}

/// `sum(y * r)`: a scalar loss whose gradient w.r.t. `y` is `r`, used by gradient checks.
pub fn dot(y: &[f32], r: &[f32]) -> f64 {
    y.iter().zip(r).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// Every f32 tensor of a safetensors file, by name: (shape, values).
pub fn read_tensors(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, (view.shape().to_vec(), data))
        })
        .collect()
}

/// Output, loss `mse(model(x, t), target)` and the gradient of every parameter, on `be`.
pub fn loss_and_grads(
    be: &dyn Backend,
    model: &UNet2D,
    values: &[Vec<f32>],
    x: &[f32],
    t: &[f32],
    target: &[f32],
) -> (Vec<f32>, f32, Vec<Vec<f32>>) {
    loss_and_grads_labelled(be, model, values, x, t, None, target)
}

/// [`loss_and_grads`] with class labels for a class-conditional model.
pub fn loss_and_grads_labelled(
    be: &dyn Backend,
    model: &UNet2D,
    values: &[Vec<f32>],
    x: &[f32],
    t: &[f32],
    labels: Option<&[u32]>,
    target: &[f32],
) -> (Vec<f32>, f32, Vec<Vec<f32>>) {
    let c = &model.config;
    let (n, s) = (t.len(), c.size());
    let params: Vec<Tensor> = model
        .params
        .specs
        .iter()
        .zip(values)
        .map(|(spec, v)| be.upload(&spec.shape, v).unwrap())
        .collect();
    let mut tape = Tape::new(be);
    let p = tape.leaves(&params, true);
    let x = tape.leaf(be.upload(&[n, c.in_channels, s, s], x).unwrap(), false);
    let t = be.upload(&[n], t).unwrap();
    let out = model.forward(&mut tape, &p, x, &t, labels).unwrap();
    let target = be.upload(&[n, c.out_channels, s, s], target).unwrap();
    let (loss, d_out) = be
        .mse_loss_with_grad(tape.value(out), &target, 1.0)
        .unwrap();
    let out_values = be.to_vec(tape.value(out)).unwrap();
    let mut grads = tape.backward(out, d_out).unwrap();
    let grads = p
        .iter()
        .map(|&v| be.to_vec(&grads.take(v).expect("a gradient")).unwrap())
        .collect();
    (out_values, be.to_vec(&loss).unwrap()[0], grads)
}
