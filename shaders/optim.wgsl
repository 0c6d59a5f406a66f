// In-place optimizer updates, one invocation per element, WG per workgroup, workgroups as an
// x-by-y grid (linear = wid.x + wid.y * nwg.x).
//   adamw_step: g <- c g (c: global-norm clipping); p <- p (1 - lr wd); m <- b1 m + (1 - b1) g; v <- b2 v + (1 - b2) g^2;
//               p <- p - (lr / (1 - b1^k)) m / (sqrt(v) / sqrt(1 - b2^k) + eps)
//   ema_update: ema <- d ema + (1 - d) p

override WG: u32 = 256u;

struct AdamW {
    n: u32,
    beta1: f32,
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    eps: f32,
    // 1 - lr wd.
    decay_factor: f32,
    // lr / (1 - b1^k).
    step_size: f32,
    // sqrt(1 - b2^k).
    sqrt_bias_correction2: f32,
    // The clipping factor c.
    grad_scale: f32,
}

struct Ema {
    n: u32,
    decay: f32,
    one_minus_decay: f32,
}

// adamw_step: param, grad, m, v.
@group(0) @binding(0) var<uniform> h: AdamW;
@group(0) @binding(1) var<storage, read_write> param: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;

// ema_update: ema, param.
@group(0) @binding(0) var<uniform> e: Ema;
@group(0) @binding(1) var<storage, read_write> ema: array<f32>;
@group(0) @binding(2) var<storage, read> source: array<f32>;

fn index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

@compute @workgroup_size(WG)
fn adamw_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if (i >= h.n) {
        return;
    }
    let g = grad[i] * h.grad_scale;
    let p = param[i] * h.decay_factor;
    let m1 = h.beta1 * m[i] + h.one_minus_beta1 * g;
    let v1 = h.beta2 * v[i] + h.one_minus_beta2 * g * g;
    m[i] = m1;
    v[i] = v1;
    param[i] = p - h.step_size * m1 / (sqrt(v1) / h.sqrt_bias_correction2 + h.eps);
}

@compute @workgroup_size(WG)
fn ema_update(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if (i >= e.n) {
        return;
    }
    ema[i] = e.decay * ema[i] + e.one_minus_decay * source[i];
}
