// Class embedding (nn.Embedding): a table W [K, D] looked up by u32 labels l [B].
//   embedding:          one invocation per element of y [B, D],  y[b, d] = W[l_b, d]
//   embedding_backward: one invocation per value of the gradient's parts in the arena;
//                       part 0: dW[k, d] = sum_{b : l_b = k} dy[b, d] (batch order), others 0
// Workgroups are laid out as an x-by-y grid (linear index = wid.x + wid.y * nwg.x).

override WG: u32 = 256u;

struct Params {
    batch: u32,
    classes: u32,
    dim: u32,
    offset: u32,
    splits: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> labels: array<u32>;

// embedding
@group(0) @binding(2) var<storage, read> table: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

// embedding_backward
@group(0) @binding(2) var<storage, read> dy: array<f32>;
@group(0) @binding(3) var<storage, read_write> arena: array<f32>;

@compute @workgroup_size(WG)
fn embedding(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i < p.batch * p.dim) {
        let b = i / p.dim;
        y[i] = table[labels[b] * p.dim + i % p.dim];
    }
}

@compute @workgroup_size(WG)
fn embedding_backward(@builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    let n = p.classes * p.dim;
    if (i >= p.splits * n) {
        return;
    }
    if (i >= n) {
        arena[p.offset + i] = 0.0;
        return;
    }
    let k = i / p.dim;
    let d = i % p.dim;
    var acc = 0.0;
    for (var b = 0u; b < p.batch; b++) {
        if (labels[b] == k) {
            acc += dy[b * p.dim + d];
        }
    }
    arena[p.offset + i] = acc;
}
