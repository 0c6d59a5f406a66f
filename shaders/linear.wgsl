// Matrix products for the linear layer, and the reductions its backward needs.
//
//   matmul:              C_s[i, j] = sum_{l in split s} A[i, l] B[l, j]
//   matmul_bias:         C[i, j]   = sum_l A[i, l] B[l, j] + bias[j]        (one split)
//   matmul_add:          C_s[i, j] = sum_{l in split s} A[i, l] B[l, j] + [s = 0] D[i, j]
//   column_sums_partial: part[s, j] = sum_{i in row block s} dy[i, j]
//
// A [m, k] and B [k, n] are read through (row, column) strides, so the same kernel computes
// y = x w^T (B = w^T), dx = dy w and dw = dy^T x (A = dy^T). C is row-major [m, n]; split s of
// the reduction writes C_s at offset c_offset + s * m * n, and the parts are summed
// afterwards (src/ops/grads.rs); a split past the end of k writes zeros. matmul_add adds the
// row-major [m, n] matrix D to split 0 only, so the parts sum to A B + D (dx = dy w + acc).
//
// Tiling: a workgroup of WG_X x WG_Y invocations computes a BM x BN = (WG_Y * TM) x (WG_X * TN)
// tile of C. Per step it stages a BM x BK slice of A and a BK x BN slice of B in workgroup
// memory; each invocation then accumulates its TM x TN outputs (rows ty + WG_Y * i, columns
// tx + WG_X * j, strided so neighbouring invocations read neighbouring words) in registers.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    k_chunk: u32,
    a_rs: u32,
    a_cs: u32,
    b_rs: u32,
    b_cs: u32,
    splits: u32,
    c_offset: u32,
}

override WG_X: u32 = 16u;
override WG_Y: u32 = 16u;
override BK: u32 = 16u;
// Invocations per workgroup of the reductions.
override WG: u32 = 256u;
const TM: u32 = 4u;
const TN: u32 = 4u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;

// matmul binds C at 3; matmul_bias binds the bias at 3 and C at 4; matmul_add binds D at 3
// and C at 4.
@group(0) @binding(3) var<storage, read_write> c: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read> addend: array<f32>;
@group(0) @binding(4) var<storage, read_write> c_plus: array<f32>;

// column_sums_partial binds dy at 1 and the arena of parts at 2.
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

// A tile stored [BK][BM] and B tile [BK][BN]: the inner loop reads both along a row.
var<workgroup> a_tile: array<f32, BK * WG_Y * TM>;
var<workgroup> b_tile: array<f32, BK * WG_X * TN>;

var<private> acc: array<array<f32, TN>, TM>;

// Accumulates this invocation's TM x TN outputs of tile (wid.y, wid.x) over split wid.z
// into `acc`.
fn tile_product(wid: vec3<u32>, lid: vec3<u32>) {
    let bm = WG_Y * TM;
    let bn = WG_X * TN;
    let threads = WG_X * WG_Y;
    let t = lid.y * WG_X + lid.x;
    let row0 = wid.y * bm;
    let col0 = wid.x * bn;
    let k_begin = wid.z * p.k_chunk;
    let k_end = min(k_begin + p.k_chunk, p.k);
    for (var i = 0u; i < TM; i++) {
        for (var j = 0u; j < TN; j++) {
            acc[i][j] = 0.0;
        }
    }
    for (var k0 = k_begin; k0 < k_end; k0 += BK) {
        // Stage A[row0.., k0..] (zero outside A), walking memory-contiguous first.
        for (var e = t; e < bm * BK; e += threads) {
            var r: u32;
            var l: u32;
            if (p.a_cs == 1u) {
                r = e / BK;
                l = e % BK;
            } else {
                l = e / bm;
                r = e % bm;
            }
            let gr = row0 + r;
            let gl = k0 + l;
            var v = 0.0;
            if (gr < p.m && gl < k_end) {
                v = a[gr * p.a_rs + gl * p.a_cs];
            }
            a_tile[l * bm + r] = v;
        }
        for (var e = t; e < BK * bn; e += threads) {
            var l: u32;
            var cc: u32;
            if (p.b_cs == 1u) {
                l = e / bn;
                cc = e % bn;
            } else {
                cc = e / BK;
                l = e % BK;
            }
            let gl = k0 + l;
            let gc = col0 + cc;
            var v = 0.0;
            if (gl < k_end && gc < p.n) {
                v = b[gl * p.b_rs + gc * p.b_cs];
            }
            b_tile[l * bn + cc] = v;
        }
        workgroupBarrier();
        for (var l = 0u; l < BK; l++) {
            var av: array<f32, TM>;
            var bv: array<f32, TN>;
            for (var i = 0u; i < TM; i++) {
                av[i] = a_tile[l * bm + lid.y + WG_Y * i];
            }
            for (var j = 0u; j < TN; j++) {
                bv[j] = b_tile[l * bn + lid.x + WG_X * j];
            }
            for (var i = 0u; i < TM; i++) {
                for (var j = 0u; j < TN; j++) {
                    acc[i][j] = fma(av[i], bv[j], acc[i][j]);
                }
            }
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(WG_X, WG_Y)
fn matmul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    tile_product(wid, lid);
    let base = p.c_offset + wid.z * p.m * p.n;
    for (var i = 0u; i < TM; i++) {
        let r = wid.y * WG_Y * TM + lid.y + WG_Y * i;
        for (var j = 0u; j < TN; j++) {
            let cc = wid.x * WG_X * TN + lid.x + WG_X * j;
            if (r < p.m && cc < p.n) {
                c[base + r * p.n + cc] = acc[i][j];
            }
        }
    }
}

@compute @workgroup_size(WG_X, WG_Y)
fn matmul_bias(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    tile_product(wid, lid);
    for (var i = 0u; i < TM; i++) {
        let r = wid.y * WG_Y * TM + lid.y + WG_Y * i;
        for (var j = 0u; j < TN; j++) {
            let cc = wid.x * WG_X * TN + lid.x + WG_X * j;
            if (r < p.m && cc < p.n) {
                c_plus[r * p.n + cc] = acc[i][j] + bias[cc];
            }
        }
    }
}

@compute @workgroup_size(WG_X, WG_Y)
fn matmul_add(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    tile_product(wid, lid);
    let base = p.c_offset + wid.z * p.m * p.n;
    for (var i = 0u; i < TM; i++) {
        let r = wid.y * WG_Y * TM + lid.y + WG_Y * i;
        for (var j = 0u; j < TN; j++) {
            let cc = wid.x * WG_X * TN + lid.x + WG_X * j;
            if (r < p.m && cc < p.n) {
                var v = acc[i][j];
                if (wid.z == 0u) {
                    v += addend[r * p.n + cc];
                }
                c_plus[base + r * p.n + cc] = v;
            }
        }
    }
}

// Column j = wid.x * WG + lid of dy [p.m, p.n], summed over rows [s * k_chunk, (s + 1) * k_chunk)
// for block s = wid.y; consecutive invocations read consecutive words of a row.
@compute @workgroup_size(WG)
fn column_sums_partial(@builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let j = wid.x * WG + lid;
    let s = wid.y;
    if (j < p.n) {
        let end = min((s + 1u) * p.k_chunk, p.m);
        var sum = 0.0;
        for (var i = s * p.k_chunk; i < end; i++) {
            sum += src[i * p.n + j];
        }
        dst[p.c_offset + s * p.n + j] = sum;
    }
}
