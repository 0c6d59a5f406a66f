// The fused diffusion kernels (see src/ops/diffusion.rs for the equations), one invocation per
// element, WG per workgroup, workgroups as an x-by-y grid (linear = wid.x + wid.y * nwg.x).
//   q_sample:  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t per sample
//   ddpm_step: x_{t-1} = c0 clip(x0_hat) + ct x_t + sigma z
//   ddim_step: x_{t'} = sqrt(abar_{t'}) clip(x0_hat) + sqrt(1 - abar_{t'} - sigma^2) eps_hat + sigma z

override WG: u32 = 256u;

struct QSampleParams {
    n: u32,
    per_sample: u32,
    steps: u32,
}

struct StepParams {
    n: u32,
    // 0 epsilon, 1 v, 2 sample.
    prediction: u32,
    clip: u32,
    recompute_eps: u32,
    sqrt_abar_t: f32,
    sqrt_one_minus_abar_t: f32,
    clip_range: f32,
    // c0 (DDPM) or sqrt(abar_{t'}) (DDIM).
    coef_x0: f32,
    // ct (DDPM, times x_t) or sqrt(1 - abar_{t'} - sigma^2) (DDIM, times eps_hat).
    coef_second: f32,
    sigma: f32,
}

// q_sample: x0, eps, t, alphas_cumprod, x_t.
@group(0) @binding(0) var<uniform> q: QSampleParams;
@group(0) @binding(1) var<storage, read> x0: array<f32>;
@group(0) @binding(2) var<storage, read> eps: array<f32>;
@group(0) @binding(3) var<storage, read> timesteps: array<f32>;
@group(0) @binding(4) var<storage, read> alphas_cumprod: array<f32>;
@group(0) @binding(5) var<storage, read_write> noised: array<f32>;

// Steps: x_t, model output, noise z, x_prev.
@group(0) @binding(0) var<uniform> s: StepParams;
@group(0) @binding(1) var<storage, read> x_t: array<f32>;
@group(0) @binding(2) var<storage, read> model_output: array<f32>;
@group(0) @binding(3) var<storage, read> noise: array<f32>;
@group(0) @binding(4) var<storage, read_write> x_prev: array<f32>;

fn index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

@compute @workgroup_size(WG)
fn q_sample(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if (i >= q.n) {
        return;
    }
    // Timesteps must be integers in [0, T); clamp so that a bad one stays inside the table.
    let last = q.steps - 1u;
    let t = min(u32(clamp(timesteps[i / q.per_sample], 0.0, f32(last))), last);
    let abar = alphas_cumprod[t];
    noised[i] = sqrt(abar) * x0[i] + sqrt(1.0 - abar) * eps[i];
}

// x0_hat from the model output m at x_t = x, by prediction type.
fn predict_x0(x: f32, m: f32) -> f32 {
    switch s.prediction {
        case 0u: { return (x - s.sqrt_one_minus_abar_t * m) / s.sqrt_abar_t; }
        case 1u: { return s.sqrt_abar_t * x - s.sqrt_one_minus_abar_t * m; }
        default: { return m; }
    }
}

fn clip_x0(x0: f32) -> f32 {
    if (s.clip != 0u) {
        return clamp(x0, -s.clip_range, s.clip_range);
    }
    return x0;
}

@compute @workgroup_size(WG)
fn ddpm_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if (i >= s.n) {
        return;
    }
    let x = x_t[i];
    let x0 = clip_x0(predict_x0(x, model_output[i]));
    x_prev[i] = s.coef_x0 * x0 + s.coef_second * x + s.sigma * noise[i];
}

@compute @workgroup_size(WG)
fn ddim_step(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if (i >= s.n) {
        return;
    }
    let x = x_t[i];
    let m = model_output[i];
    let x0 = predict_x0(x, m);
    let x0c = clip_x0(x0);
    var eps_hat: f32;
    if (s.recompute_eps != 0u) {
        eps_hat = (x - s.sqrt_abar_t * x0c) / s.sqrt_one_minus_abar_t;
    } else if (s.prediction == 0u) {
        eps_hat = m;
    } else if (s.prediction == 1u) {
        eps_hat = s.sqrt_abar_t * m + s.sqrt_one_minus_abar_t * x;
    } else {
        eps_hat = (x - s.sqrt_abar_t * x0) / s.sqrt_one_minus_abar_t;
    }
    x_prev[i] = s.coef_x0 * x0c + s.coef_second * eps_hat + s.sigma * noise[i];
}
