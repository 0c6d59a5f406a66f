//! The tape's FLOP count (what `diffwgpu bench` turns into TFLOP/s): `2 M N K` for every
//! product of a conv, a linear layer and attention, and for the whole U-Net a count that
//! grows exactly with the batch.

use diffwgpu::autodiff::Tape;
use diffwgpu::nn::{UNet2D, UNet2DConfig};
use diffwgpu::ops::conv2d::Conv2dParams;
use diffwgpu::{Backend, Cpu};

fn zeros(shape: &[usize]) -> diffwgpu::Tensor {
    Cpu.zeros(shape).unwrap()
}

#[test]
fn products_count_two_m_n_k() {
    let mut tape = Tape::inference(&Cpu);
    // A 3x3 conv, stride 2, padding 1: [2, 3, 8, 8] -> [2, 5, 4, 4].
    let (b, cin, cout, k) = (2, 3, 5, 3);
    let x = tape.leaf(zeros(&[b, cin, 8, 8]), false);
    let w = tape.leaf(zeros(&[cout, cin, k, k]), false);
    let bias = tape.leaf(zeros(&[cout]), false);
    let y = tape
        .conv2d(x, w, Some(bias), Conv2dParams::new(2, 1))
        .unwrap();
    assert_eq!(tape.shape(y), [b, cout, 4, 4]);
    let conv = 2 * b * cout * 4 * 4 * cin * k * k;
    assert_eq!(tape.flops(), conv as u64);

    // A linear layer [M, K] x [N, K]^T.
    let (m, kk, n) = (6, 7, 4);
    let x = tape.leaf(zeros(&[m, kk]), false);
    let w = tape.leaf(zeros(&[n, kk]), false);
    tape.linear(x, w, None).unwrap();
    let linear = 2 * m * n * kk;
    assert_eq!(tape.flops(), (conv + linear) as u64);

    // The same product as two stacked weights.
    let halves = [
        tape.leaf(zeros(&[n / 2, kk]), false),
        tape.leaf(zeros(&[n / 2, kk]), false),
    ];
    let biases = [
        tape.leaf(zeros(&[n / 2]), false),
        tape.leaf(zeros(&[n / 2]), false),
    ];
    tape.linear_stacked(x, &halves, &biases).unwrap();
    assert_eq!(tape.flops(), (conv + 2 * linear) as u64);

    // Attention over qkv [B, L, 3C] with C = heads d: 4 B heads L^2 d.
    let (l, heads, d) = (5, 2, 3);
    let qkv = tape.leaf(zeros(&[b, l, 3 * heads * d]), false);
    tape.attention(qkv, heads).unwrap();
    let attention = 4 * b * heads * l * l * d;
    assert_eq!(tape.flops(), (conv + 2 * linear + attention) as u64);
}

/// Every product of the U-Net has the batch as a factor, so a forward pass of batch B costs
/// B times a pass of one image.
#[test]
fn unet_flops_grow_with_the_batch() {
    let model = UNet2D::new(&UNet2DConfig::preset("tiny").unwrap()).unwrap();
    let params: Vec<_> = model.params.specs.iter().map(|s| zeros(&s.shape)).collect();
    let forward = |batch: usize| {
        let mut tape = Tape::inference(&Cpu);
        let p = tape.leaves(&params, false);
        let x = tape.leaf(zeros(&[batch, 1, 16, 16]), false);
        let t = Cpu.upload(&[batch], &vec![10.0; batch]).unwrap();
        model.forward(&mut tape, &p, x, &t, None).unwrap();
        tape.flops()
    };
    let one = forward(1);
    assert!(one > 0);
    assert_eq!(forward(3), 3 * one);
}
