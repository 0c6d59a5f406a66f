// Broadcast add over rows: x is `rows = B * C` contiguous rows of `row_len = H * W` values.
//   add_per_channel:          one invocation per element, y_i = x_i + v[i / row_len]
//   add_per_channel_backward: one workgroup of WG per row r, dv[r] = sum_s dy[r, s]
//                             (strided loads, then a tree in workgroup memory)
// Workgroups are laid out as an x-by-y grid (linear index = wid.x + wid.y * nwg.x).

override WG: u32 = 256u;

struct Params {
    n: u32,
    rows: u32,
    row_len: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// add_per_channel
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

// add_per_channel_backward
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read_write> dv: array<f32>;

var<workgroup> scratch: array<f32, WG>;

@compute @workgroup_size(WG)
fn add_per_channel(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i < p.n) {
        y[i] = x[i] + v[i / p.row_len];
    }
}

@compute @workgroup_size(WG)
fn add_per_channel_backward(@builtin(workgroup_id) wid: vec3<u32>,
                            @builtin(num_workgroups) nwg: vec3<u32>,
                            @builtin(local_invocation_index) lid: u32) {
    let r = wid.x + wid.y * nwg.x;
    if (r >= p.rows) {
        return;
    }
    var acc = 0.0;
    for (var s = lid; s < p.row_len; s += WG) {
        acc += dy[r * p.row_len + s];
    }
    scratch[lid] = acc;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            scratch[lid] = scratch[lid] + scratch[lid + stride];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        dv[r] = scratch[0];
    }
}
