// The fused optimizer step (see src/ops/optim.rs), in place, one invocation per element, WG per
// workgroup, workgroups as an x-by-y grid (linear = wid.x + wid.y * nwg.x):
//   c = min(1, max_norm / (sqrt(n2) + 1e-6))  (1 without clipping; no update when n2 is not finite)
//   g <- c g;  p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
//   p <- p - (lr / (1 - b1^k)) m / (sqrt(v) / sqrt(1 - b2^k) + eps);  ema <- d ema + (1 - d) p

override WG: u32 = 256u;

struct Step {
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
    // 0 without clipping.
    max_grad_norm: f32,
    ema_decay: f32,
    one_minus_ema_decay: f32,
}

@group(0) @binding(0) var<uniform> h: Step;
@group(0) @binding(1) var<storage, read_write> param: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;
@group(0) @binding(5) var<storage, read_write> ema: array<f32>;
@group(0) @binding(6) var<storage, read> norm2: array<f32>;

@compute @workgroup_size(WG)
fn adamw_ema_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    let n2 = norm2[0];
    // An infinite or NaN norm has an all-ones exponent; the bit test holds whatever the
    // compiler assumes about non-finite floats.
    if (i >= h.n || (bitcast<u32>(n2) & 0x7f800000u) == 0x7f800000u) {
        return;
    }
    var c = 1.0;
    if (h.max_grad_norm > 0.0) {
        c = min(1.0, h.max_grad_norm / (sqrt(n2) + 1e-6));
    }
    let g = grad[i] * c;
    let p = param[i] * h.decay_factor;
    let m1 = h.beta1 * m[i] + h.one_minus_beta1 * g;
    let v1 = h.beta2 * v[i] + h.one_minus_beta2 * g * g;
    m[i] = m1;
    v[i] = v1;
    let p1 = p - h.step_size * m1 / (sqrt(v1) / h.sqrt_bias_correction2 + h.eps);
    param[i] = p1;
    ema[i] = h.ema_decay * ema[i] + h.one_minus_ema_decay * p1;
}
