// Group normalization, torch.nn.GroupNorm semantics, optionally fused with the SiLU that
// follows it in every resnet (p.silu = 1: y = silu(z), else y = z). x [B, C, S] (S = product
// of the spatial dims), G groups of Cg = C / G channels; the n = Cg * S values of group (b, g)
// are contiguous from (b G + g) n. Workgroups are laid out as an x-by-y grid (index = wid.x +
// wid.y * nwg.x).
//
//   group_norm_forward: one workgroup of WG per (b, g).
//       K = x[first], m = mean(x - K), var = mean(((x - K) - m)^2)    (two tree sums)
//       rstd = 1 / sqrt(var + eps), xhat = ((x - K) - m) * rstd, z = xhat * gamma_c + beta_c,
//       y = act(z), mean[b, g] = K + m, rstd[b, g] = rstd
//   group_norm_backward: one workgroup of WG per (b, g). With dz = dy * act'(z) (z recomputed
//       from x, the saved statistics, gamma and beta) and u = dz * gamma_c:
//       per channel c of the group (one tree sum of a vec2 each), the parts (one per sample)
//       of dgamma and dbeta in the arena (src/ops/grads.rs):
//           arena[gamma_offset + b C + c] = sum_s dz * xhat,  arena[beta_offset + b C + c] = sum_s dz
//       and from them the group means mean(u) = sum_c gamma_c dbeta_c / n,
//       mean(u * xhat) = sum_c gamma_c dgamma_c / n;
//       then dx = rstd * (u - mean(u) - xhat * mean(u * xhat)) (+ dx_acc with p.has_acc: the
//       gradient x already has from its other readers, added as dx is written). gamma and
//       beta come as one buffer in both kernels, affine = [gamma | beta], so that eight storage
//       bindings suffice.
//   silu(z) = z sigmoid(z),  silu'(z) = sigmoid(z) (1 + z (1 - sigmoid(z))).

override WG: u32 = 256u;

struct Params {
    batch: u32,
    channels: u32,
    groups: u32,
    spatial: u32,
    eps: f32,
    gamma_offset: u32,
    beta_offset: u32,
    silu: u32,
    has_acc: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

@group(0) @binding(1) var<storage, read> x: array<f32>;
// gamma | beta, [2 C]: one binding for both.
@group(0) @binding(2) var<storage, read> affine: array<f32>;

// group_norm_forward
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read_write> mean_out: array<f32>;
@group(0) @binding(5) var<storage, read_write> rstd_out: array<f32>;

// group_norm_backward
@group(0) @binding(3) var<storage, read> mean_in: array<f32>;
@group(0) @binding(4) var<storage, read> rstd_in: array<f32>;
@group(0) @binding(5) var<storage, read> dy: array<f32>;
@group(0) @binding(6) var<storage, read> dx_acc: array<f32>;
@group(0) @binding(7) var<storage, read_write> dx: array<f32>;
@group(0) @binding(8) var<storage, read_write> arena: array<f32>;

var<workgroup> scratch: array<vec2<f32>, WG>;

fn sigmoid(z: f32) -> f32 {
    return 1.0 / (1.0 + exp(-z));
}

// The activation after the normalization.
fn act(z: f32) -> f32 {
    if (p.silu != 0u) {
        return z * sigmoid(z);
    }
    return z;
}

// dy * act'(z).
fn act_backward(z: f32, dy: f32) -> f32 {
    if (p.silu != 0u) {
        let s = sigmoid(z);
        return dy * s * (1.0 + z * (1.0 - s));
    }
    return dy;
}

// Sum of `v` over the workgroup (a tree of log2(WG) levels); every invocation gets the total.
// Must be called in workgroup-uniform control flow.
fn workgroup_sum(lid: u32, v: vec2<f32>) -> vec2<f32> {
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

@compute @workgroup_size(WG)
fn group_norm_forward(@builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let bg = wid.x + wid.y * nwg.x;
    if (bg >= p.batch * p.groups) {
        return;
    }
    let cg = p.channels / p.groups;
    let n = cg * p.spatial;
    let base = bg * n;
    let c0 = (bg % p.groups) * cg;
    let shift = x[base];

    var acc = 0.0;
    for (var i = lid; i < n; i += WG) {
        acc += x[base + i] - shift;
    }
    let m = workgroup_sum(lid, vec2(acc, 0.0)).x / f32(n);

    var acc2 = 0.0;
    for (var i = lid; i < n; i += WG) {
        let d = (x[base + i] - shift) - m;
        acc2 += d * d;
    }
    let variance = workgroup_sum(lid, vec2(acc2, 0.0)).x / f32(n);
    let rstd = 1.0 / sqrt(variance + p.eps);

    for (var i = lid; i < n; i += WG) {
        let c = c0 + i / p.spatial;
        y[base + i] = act(((x[base + i] - shift) - m) * rstd * affine[c] + affine[p.channels + c]);
    }
    if (lid == 0u) {
        mean_out[bg] = shift + m;
        rstd_out[bg] = rstd;
    }
}

@compute @workgroup_size(WG)
fn group_norm_backward(@builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let bg = wid.x + wid.y * nwg.x;
    if (bg >= p.batch * p.groups) {
        return;
    }
    let cg = p.channels / p.groups;
    let n = cg * p.spatial;
    let base = bg * n;
    let c0 = (bg % p.groups) * cg;
    let row = (bg / p.groups) * p.channels;
    let mean = mean_in[bg];
    let rstd = rstd_in[bg];

    // (sum u, sum u * xhat) over the group, from the channels' (dbeta, dgamma) parts.
    var sums = vec2(0.0, 0.0);
    for (var j = 0u; j < cg; j++) {
        let c = c0 + j;
        let first = base + j * p.spatial;
        var part = vec2(0.0, 0.0);
        for (var s = lid; s < p.spatial; s += WG) {
            let xhat = (x[first + s] - mean) * rstd;
            let dz = act_backward(xhat * affine[c] + affine[p.channels + c], dy[first + s]);
            part += vec2(dz * xhat, dz);
        }
        let total = workgroup_sum(lid, part);
        if (lid == 0u) {
            arena[p.gamma_offset + row + c] = total.x;
            arena[p.beta_offset + row + c] = total.y;
        }
        sums += affine[c] * total.yx;
    }
    let means = sums / f32(n);

    for (var i = lid; i < n; i += WG) {
        let c = c0 + i / p.spatial;
        let xhat = (x[base + i] - mean) * rstd;
        let u = act_backward(xhat * affine[c] + affine[p.channels + c], dy[base + i]) * affine[c];
        var v = rstd * (u - means.x - xhat * means.y);
        if (p.has_acc != 0u) {
            v += dx_acc[base + i];
        }
        dx[base + i] = v;
    }
}
