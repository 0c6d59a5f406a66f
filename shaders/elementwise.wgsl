// Elementwise ops, one invocation per element, WG per workgroup, workgroups laid out as an
// x-by-y grid (linear index = wid.x + wid.y * nwg.x).
//   add:           y = a + b
//   scale:         y = s * a
//   silu:          y = a * sigmoid(a)
//   silu_backward: y = b * sigmoid(a) * (1 + a * (1 - sigmoid(a)))   (a = x, b = dy)
//   dropout:       y = a / (1 - p) where b >= p, else 0   (b = uniforms in [0, 1), p = scale)

struct Params {
    n: u32,
    scale: f32,
}

override WG: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;

// Two-input entries bind b at 2 and y at 3.
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> y2: array<f32>;

// One-input entries bind y at 2.
@group(0) @binding(2) var<storage, read_write> y1: array<f32>;

fn index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

fn sigmoid(x: f32) -> f32 {
    return 1.0 / (1.0 + exp(-x));
}

@compute @workgroup_size(WG)
fn add(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
       @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if (i < p.n) {
        y2[i] = a[i] + b[i];
    }
}

@compute @workgroup_size(WG)
fn scale(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if (i < p.n) {
        y1[i] = p.scale * a[i];
    }
}

@compute @workgroup_size(WG)
fn silu(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if (i < p.n) {
        let x = a[i];
        y1[i] = x * sigmoid(x);
    }
}

@compute @workgroup_size(WG)
fn silu_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if (i < p.n) {
        let x = a[i];
        let s = sigmoid(x);
        y2[i] = b[i] * s * (1.0 + x * (1.0 - s));
    }
}

@compute @workgroup_size(WG)
fn dropout(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if (i < p.n) {
        y2[i] = select(0.0, a[i] / (1.0 - p.scale), b[i] >= p.scale);
    }
}
