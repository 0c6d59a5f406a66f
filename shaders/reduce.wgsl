// Reductions to one value, in passes. A pass gives workgroup w the contiguous chunk
// [w * CHUNK, (w + 1) * CHUNK) of its input (workgroups as an x-by-y grid,
// w = wid.x + wid.y * nwg.x); each of the WG invocations adds ITEMS elements strided by WG
// (coalesced loads), then a tree in workgroup memory sums the WG values, and invocation 0
// writes out[w] = scale * sum. The host repeats `sum_partials` over the partials until one
// value is left.
//   sum_partials:           out[w] = scale * sum_{i in chunk w} a_i
//   sum_squares_partials:   out[w] = scale * sum_{i in chunk w} a_i^2
//   squared_error_partials: out[w] = scale * sum_{i in chunk w} (a_i - b_i)^2
//   mse_loss_with_grad:     the same, and grad_i = grad_scale * (a_i - b_i) for every i of
//                           chunk w (grad_scale = 2 d_loss / N): the MSE loss's first pass
//                           and its gradient in one
//   weighted_mse_loss_with_grad:
//                           the same with every term times its sample's weight
//                           w_s = weights[i / sample_len]: out[w] = scale * sum w_s (a_i - b_i)^2,
//                           grad_i = grad_scale * w_s (a_i - b_i) (Min-SNR-gamma weighting)

override WG: u32 = 256u;
override ITEMS: u32 = 16u;
override CHUNK: u32 = WG * ITEMS;

struct Params {
    n: u32,
    scale: f32,
    grad_scale: f32,
    sample_len: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;

// One-input entries write at binding 2.
@group(0) @binding(2) var<storage, read_write> out1: array<f32>;

// Two-input entries read b at binding 2 and write at binding 3; the MSE losses write the
// gradient at 4, and the weighted one reads one weight per sample at 5.
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out2: array<f32>;
@group(0) @binding(4) var<storage, read_write> grad: array<f32>;
@group(0) @binding(5) var<storage, read> weights: array<f32>;

var<workgroup> scratch: array<f32, WG>;

// Sum of `v` over the workgroup (a tree of log2(WG) levels); every invocation gets the total.
// Must be called in workgroup-uniform control flow.
fn workgroup_sum(lid: u32, v: f32) -> f32 {
    scratch[lid] = v;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            scratch[lid] = scratch[lid] + scratch[lid + stride];
        }
        workgroupBarrier();
    }
    let total = scratch[0];
    workgroupBarrier();
    return total;
}

fn chunk_index(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.x + wid.y * nwg.x;
}

// False for the few extra workgroups of an x-by-y grid (an empty input still has one chunk).
fn is_chunk(w: u32) -> bool {
    return w < max((p.n + CHUNK - 1u) / CHUNK, 1u);
}

@compute @workgroup_size(WG)
fn sum_partials(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let w = chunk_index(wid, nwg);
    var acc = 0.0;
    for (var k = 0u; k < ITEMS; k++) {
        let i = w * CHUNK + k * WG + lid;
        if (i < p.n) {
            acc += a[i];
        }
    }
    let total = workgroup_sum(lid, acc);
    if (lid == 0u && is_chunk(w)) {
        out1[w] = p.scale * total;
    }
}

@compute @workgroup_size(WG)
fn sum_squares_partials(@builtin(workgroup_id) wid: vec3<u32>,
                        @builtin(num_workgroups) nwg: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    let w = chunk_index(wid, nwg);
    var acc = 0.0;
    for (var k = 0u; k < ITEMS; k++) {
        let i = w * CHUNK + k * WG + lid;
        if (i < p.n) {
            let v = a[i];
            acc += v * v;
        }
    }
    let total = workgroup_sum(lid, acc);
    if (lid == 0u && is_chunk(w)) {
        out1[w] = p.scale * total;
    }
}

@compute @workgroup_size(WG)
fn squared_error_partials(@builtin(workgroup_id) wid: vec3<u32>,
                          @builtin(num_workgroups) nwg: vec3<u32>,
                          @builtin(local_invocation_index) lid: u32) {
    let w = chunk_index(wid, nwg);
    var acc = 0.0;
    for (var k = 0u; k < ITEMS; k++) {
        let i = w * CHUNK + k * WG + lid;
        if (i < p.n) {
            let d = a[i] - b[i];
            acc += d * d;
        }
    }
    let total = workgroup_sum(lid, acc);
    if (lid == 0u && is_chunk(w)) {
        out2[w] = p.scale * total;
    }
}

@compute @workgroup_size(WG)
fn mse_loss_with_grad(@builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let w = chunk_index(wid, nwg);
    var acc = 0.0;
    for (var k = 0u; k < ITEMS; k++) {
        let i = w * CHUNK + k * WG + lid;
        if (i < p.n) {
            let d = a[i] - b[i];
            grad[i] = p.grad_scale * d;
            acc += d * d;
        }
    }
    let total = workgroup_sum(lid, acc);
    if (lid == 0u && is_chunk(w)) {
        out2[w] = p.scale * total;
    }
}

// With weights of one, w * d is d exactly and every other operation is mse_loss_with_grad's:
// the two give the same bits.
@compute @workgroup_size(WG)
fn weighted_mse_loss_with_grad(@builtin(workgroup_id) wid: vec3<u32>,
                               @builtin(num_workgroups) nwg: vec3<u32>,
                               @builtin(local_invocation_index) lid: u32) {
    let w = chunk_index(wid, nwg);
    var acc = 0.0;
    for (var k = 0u; k < ITEMS; k++) {
        let i = w * CHUNK + k * WG + lid;
        if (i < p.n) {
            let d = a[i] - b[i];
            let wd = weights[i / p.sample_len] * d;
            grad[i] = p.grad_scale * wd;
            acc += wd * d;
        }
    }
    let total = workgroup_sum(lid, acc);
    if (lid == 0u && is_chunk(w)) {
        out2[w] = p.scale * total;
    }
}
