// The fused step of the linear samplers (see src/ops/solver_step.rs), one invocation per
// element, WG per workgroup, workgroups as an x-by-y grid (linear = wid.x + wid.y * nwg.x):
//   d = convert(x_eval, m)            (eps_hat or x0_hat by the prediction type)
//   x_next = a x_base + b d + c prev + sigma z

override WG: u32 = 256u;

struct SolverParams {
    n: u32,
    // 0 epsilon, 1 v, 2 sample.
    prediction: u32,
    // 0 eps_hat, 1 x0_hat.
    convert_to: u32,
    // 1 when the step adds sigma z.
    noisy: u32,
    sqrt_abar: f32,
    sqrt_one_minus_abar: f32,
    a: f32,
    b: f32,
    c: f32,
    sigma: f32,
}

@group(0) @binding(0) var<uniform> p: SolverParams;
@group(0) @binding(1) var<storage, read> x_eval: array<f32>;
@group(0) @binding(2) var<storage, read> model_output: array<f32>;
@group(0) @binding(3) var<storage, read> x_base: array<f32>;
@group(0) @binding(4) var<storage, read> prev: array<f32>;
@group(0) @binding(5) var<storage, read> noise: array<f32>;
@group(0) @binding(6) var<storage, read_write> x_next: array<f32>;
@group(0) @binding(7) var<storage, read_write> converted: array<f32>;

// eps_hat or x0_hat from the model output m at x.
fn convert(x: f32, m: f32) -> f32 {
    let s0 = p.sqrt_abar;
    let s1 = p.sqrt_one_minus_abar;
    if (p.convert_to == 0u) {
        switch p.prediction {
            case 0u: { return m; }
            case 1u: { return s0 * m + s1 * x; }
            default: { return (x - s0 * m) / s1; }
        }
    }
    switch p.prediction {
        case 0u: { return (x - s1 * m) / s0; }
        case 1u: { return s0 * x - s1 * m; }
        default: { return m; }
    }
}

@compute @workgroup_size(WG)
fn solver_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i >= p.n) {
        return;
    }
    let d = convert(x_eval[i], model_output[i]);
    // c is 0 when there is no history (prev is then x_base).
    var y = p.a * x_base[i] + p.b * d + p.c * prev[i];
    if (p.noisy != 0u) {
        y += p.sigma * noise[i];
    }
    x_next[i] = y;
    converted[i] = d;
}
