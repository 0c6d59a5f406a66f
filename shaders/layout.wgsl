// Data movement on NCHW tensors. Elementwise entries use one invocation per element, WG per
// workgroup, workgroups as an x-by-y grid (linear index = wid.x + wid.y * nwg.x).
//   concat_channels:  per sample s, y[s] = a[s] (d0 = Ca H W values) ++ b[s] (d1 = Cb H W)
//   split_channels:   the inverse: y[s, r] goes to a[s, r] for r < d0, else b[s, r - d0]
//   upsample_nearest2x:          y[row, j] = x[row / 2, j / 2] over the rows of all planes
//                                (every plane has an even number of output rows), d0 = W_in
//   upsample_nearest2x_backward: dx[r, j] = sum of the 2x2 block dy[2r + {0,1}, 2j + {0,1}]
//   transpose:        y[b, n, m] = x[b, m, n], x [B, M, N] (d0 = M, d1 = N). A TILE x ROWS
//                     workgroup moves a TILE x TILE tile through workgroup memory: it reads
//                     rows of x and writes rows of y, so both are coalesced; the tile row is
//                     padded to TILE + 1 so the column reads hit different banks.

override WG: u32 = 256u;
override TILE: u32 = 32u;
override ROWS: u32 = 8u;
// The tile's rows are padded to TILE + 1.
override TILE_LEN: u32 = TILE * (TILE + 1u);

struct Params {
    n: u32,
    d0: u32,
    d1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;

// concat_channels
@group(0) @binding(1) var<storage, read> cat_a: array<f32>;
@group(0) @binding(2) var<storage, read> cat_b: array<f32>;
@group(0) @binding(3) var<storage, read_write> cat_y: array<f32>;

// split_channels
@group(0) @binding(1) var<storage, read> split_y: array<f32>;
@group(0) @binding(2) var<storage, read_write> split_a: array<f32>;
@group(0) @binding(3) var<storage, read_write> split_b: array<f32>;

// upsampling (both directions) and transpose: one input, one output
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

var<workgroup> tile: array<f32, TILE_LEN>;

fn index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

@compute @workgroup_size(WG)
fn concat_channels(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let per_sample = p.d0 + p.d1;
    let s = i / per_sample;
    let r = i % per_sample;
    if (r < p.d0) {
        cat_y[i] = cat_a[s * p.d0 + r];
    } else {
        cat_y[i] = cat_b[s * p.d1 + r - p.d0];
    }
}

@compute @workgroup_size(WG)
fn split_channels(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                  @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let per_sample = p.d0 + p.d1;
    let s = i / per_sample;
    let r = i % per_sample;
    if (r < p.d0) {
        split_a[s * p.d0 + r] = split_y[i];
    } else {
        split_b[s * p.d1 + r - p.d0] = split_y[i];
    }
}

@compute @workgroup_size(WG)
fn upsample_nearest2x(@builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let w_out = 2u * p.d0;
    let row = i / w_out;
    let j = i % w_out;
    dst[i] = src[(row / 2u) * p.d0 + j / 2u];
}

@compute @workgroup_size(WG)
fn upsample_nearest2x_backward(@builtin(workgroup_id) wid: vec3<u32>,
                               @builtin(num_workgroups) nwg: vec3<u32>,
                               @builtin(local_invocation_index) lid: u32) {
    let i = index(wid, nwg, lid);
    if (i >= p.n) {
        return;
    }
    let w_out = 2u * p.d0;
    let top = 2u * (i / p.d0) * w_out + 2u * (i % p.d0);
    let bottom = top + w_out;
    dst[i] = (src[top] + src[top + 1u]) + (src[bottom] + src[bottom + 1u]);
}

@compute @workgroup_size(TILE, ROWS)
fn transpose(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let m_dim = p.d0;
    let n_dim = p.d1;
    let base = wid.z * m_dim * n_dim;
    let m0 = wid.y * TILE;
    let n0 = wid.x * TILE;
    // Read rows m0.. of x: consecutive invocations read consecutive n.
    for (var k = 0u; k < TILE; k += ROWS) {
        let m = m0 + lid.y + k;
        let n = n0 + lid.x;
        if (m < m_dim && n < n_dim) {
            tile[(lid.y + k) * (TILE + 1u) + lid.x] = src[base + m * n_dim + n];
        }
    }
    workgroupBarrier();
    // Write rows n0.. of y: consecutive invocations write consecutive m.
    for (var k = 0u; k < TILE; k += ROWS) {
        let n = n0 + lid.y + k;
        let m = m0 + lid.x;
        if (n < n_dim && m < m_dim) {
            dst[base + n * m_dim + m] = tile[lid.x * (TILE + 1u) + lid.y + k];
        }
    }
}
