// Parameter gradients from partial sums (see src/ops/grads.rs):
//   reduce_partials: out[i] = sum_{s < splits} arena[offset + s n + i], one invocation per i
//   gather_grads:    one workgroup per work item w, items[2w] = (flat, count, start, len),
//                    items[2w + 1].x = splits: for e < count
//                      grads[flat + e] = sum_{s < splits} arena[start + s len + e]
//                    and norm_partials[w] = sum_e grads[flat + e]^2 (strided loads, then a
//                    tree in workgroup memory)
// Workgroups are laid out as an x-by-y grid (linear index = wid.x + wid.y * nwg.x).

override WG: u32 = 256u;

struct Params {
    // reduce_partials: values per part; gather_grads: work items.
    n: u32,
    splits: u32,
    offset: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> arena: array<f32>;

// reduce_partials
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

// gather_grads
@group(0) @binding(2) var<storage, read> items: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read_write> grads: array<f32>;
@group(0) @binding(4) var<storage, read_write> norm_partials: array<f32>;

var<workgroup> scratch: array<f32, WG>;

@compute @workgroup_size(WG)
fn reduce_partials(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i >= p.n) {
        return;
    }
    var sum = 0.0;
    for (var s = 0u; s < p.splits; s++) {
        sum += arena[p.offset + s * p.n + i];
    }
    out[i] = sum;
}

@compute @workgroup_size(WG)
fn gather_grads(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let w = wid.x + wid.y * nwg.x;
    // Extra workgroups of the grid still take part in the barriers below, with nothing to add.
    var count = 0u;
    var item = vec4<u32>(0u);
    var splits = 0u;
    if (w < p.n) {
        item = items[2u * w];
        count = item.y;
        splits = items[2u * w + 1u].x;
    }
    var squares = 0.0;
    for (var e = lid; e < count; e += WG) {
        var g = 0.0;
        for (var s = 0u; s < splits; s++) {
            g += arena[item.z + s * item.w + e];
        }
        grads[item.x + e] = g;
        squares += g * g;
    }
    scratch[lid] = squares;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        if (lid < stride) {
            scratch[lid] += scratch[lid + stride];
        }
        workgroupBarrier();
    }
    if (lid == 0u && w < p.n) {
        norm_partials[w] = scratch[0];
    }
}
