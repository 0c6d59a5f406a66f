// Classifier-free guidance, one invocation per element of y (half of `out`):
//   y_i = (1 - w) out[n + i] + w out[i]     (out: conditional half, then unconditional half)
// Workgroups are laid out as an x-by-y grid (linear index = wid.x + wid.y * nwg.x).

override WG: u32 = 256u;

struct Params {
    n: u32,
    w: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> out: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(WG)
fn guidance(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i < p.n) {
        y[i] = (1.0 - p.w) * out[p.n + i] + p.w * out[i];
    }
}
