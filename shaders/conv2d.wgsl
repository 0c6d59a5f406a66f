// 2-D convolution as implicit GEMM (see src/ops/conv2d.rs for the equations).
//
//   conv2d_fwd                 Y[co, n] = bias[co] + sum_k W[co, k] X[k, n]          M=Cout N=B Ho Wo K=Cin KH KW
//                              (+ add[b, co] with epilogue bit 0, + residual[b, co, oy, ox] with bit 1)
//   conv2d_bwd_input           dx[ci, n] = sum_k W^T[ci, k] dY[k, n]  (gather form)   M=Cin  N=B H W   K=Cout KH KW
//   conv2d_bwd_weight_partial  P_s[co, k] = sum_{r in split s} dY[co, r] X[k, r]      M=Cout N=Cin KH KW, R=B Ho Wo
//                              and, with has_bias, Q_s[co] = sum_{r in split s} dY[co, r]
//
// The partial kernel writes part s of dW at out_offset + s Cout K and part s of db at
// bias_offset + s Cout, both in the one arena; each parameter gradient is the sum of its
// parts (src/ops/grads.rs).
//
// The three GEMM kernels share one scheme: a workgroup of WG_M x WG_N invocations computes a
// TM x TN = 4 WG_M x 4 WG_N output tile; per step it stages a TK-deep slab of both operands in
// workgroup memory (As[kk][m], Bs[kk][n]), then each invocation accumulates a 4x4 register tile
// over rows tm + i WG_M and columns tn + j WG_N (strided, so neighbouring invocations touch
// neighbouring addresses). The operands are never materialised: the loaders read the input
// through the im2col index map. Tiles are numbered linearly over an x-by-y grid of workgroups.

struct Params {
    batch: u32,
    cin: u32,
    h: u32,
    w: u32,
    cout: u32,
    kh: u32,
    kw: u32,
    stride: u32,
    pad_top: u32,
    pad_left: u32,
    ho: u32,
    wo: u32,
    has_bias: u32,
    epilogue: u32,
    split_len: u32,
    splits: u32,
    out_offset: u32,
    bias_offset: u32,
}

override WG_M: u32 = 16u;
override WG_N: u32 = 16u;
override TK: u32 = 16u;
override TILE_WG: u32 = WG_M * WG_N;
override TM: u32 = 4u * WG_M;
override TN: u32 = 4u * WG_N;
override A_LEN: u32 = TK * TM;
override B_LEN: u32 = TK * TN;

var<workgroup> As: array<f32, A_LEN>;
var<workgroup> Bs: array<f32, B_LEN>;

@group(0) @binding(0) var<uniform> p: Params;

// conv2d_fwd
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@group(0) @binding(5) var<storage, read> add: array<f32>;
@group(0) @binding(6) var<storage, read> residual: array<f32>;

// conv2d_bwd_input (w as above)
@group(0) @binding(1) var<storage, read> dy_in: array<f32>;
@group(0) @binding(3) var<storage, read_write> dx: array<f32>;

// conv2d_bwd_weight_partial (x as above)
@group(0) @binding(2) var<storage, read> dy_w: array<f32>;
@group(0) @binding(3) var<storage, read_write> dw_partial: array<f32>;

// acc[i][j] += sum_kk As[kk][tm + i WG_M] Bs[kk][tn + j WG_N] over the staged slab.
fn mma(acc: ptr<function, array<vec4<f32>, 4>>, tm: u32, tn: u32) {
    for (var kk = 0u; kk < TK; kk++) {
        let bo = kk * TN + tn;
        let b = vec4(Bs[bo], Bs[bo + WG_N], Bs[bo + 2u * WG_N], Bs[bo + 3u * WG_N]);
        let ao = kk * TM + tm;
        for (var i = 0u; i < 4u; i++) {
            (*acc)[i] += As[ao + i * WG_M] * b;
        }
    }
}

// x[b, ci, iy, ix] with iy = oy s + ky - pt, ix = ox s + kx - pl, zero in the padding:
// the im2col element X[k = (ci, ky, kx), n = (b, oy, ox)]. `base` = b Cin H W, (y0, x0) = the
// window origin (oy s - pt, ox s - pl).
fn x_at(base: u32, y0: i32, x0: i32, k: u32) -> f32 {
    let khw = p.kh * p.kw;
    let ci = k / khw;
    let r = k - ci * khw;
    let ky = r / p.kw;
    let iy = y0 + i32(ky);
    let ix = x0 + i32(r - ky * p.kw);
    if (iy < 0 || ix < 0 || iy >= i32(p.h) || ix >= i32(p.w)) {
        return 0.0;
    }
    return x[base + (ci * p.h + u32(iy)) * p.w + u32(ix)];
}

// Y = W X + bias: tile rows are output channels, columns are output pixels (b, oy, ox).
@compute @workgroup_size(TILE_WG)
fn conv2d_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let m_len = p.cout;
    let ohw = p.ho * p.wo;
    let n_len = p.batch * ohw;
    let k_len = p.cin * p.kh * p.kw;
    let tiles_m = (m_len + TM - 1u) / TM;
    let tile = wid.x + wid.y * nwg.x;
    if (tile >= tiles_m * ((n_len + TN - 1u) / TN)) {
        return;
    }
    let m0 = (tile % tiles_m) * TM;
    let n0 = (tile / tiles_m) * TN;

    // This invocation loads column bn of every B slab: decode its pixel once.
    let bn = lid % TN;
    let n = n0 + bn;
    let b = n / ohw;
    let pix = n - b * ohw;
    let oy = pix / p.wo;
    let y0 = i32(oy * p.stride) - i32(p.pad_top);
    let x0 = i32((pix - oy * p.wo) * p.stride) - i32(p.pad_left);
    let base = b * p.cin * p.h * p.w;
    // ... and reduction index ak of rows am, am + TILE_WG / TK, ... of every A slab.
    let ak = lid % TK;

    let tm = lid / WG_N;
    let tn = lid % WG_N;
    var acc: array<vec4<f32>, 4>;
    for (var k0 = 0u; k0 < k_len; k0 += TK) {
        for (var mm = lid / TK; mm < TM; mm += TILE_WG / TK) {
            let m = m0 + mm;
            let k = k0 + ak;
            var v = 0.0;
            if (m < m_len && k < k_len) {
                v = w[m * k_len + k];
            }
            As[ak * TM + mm] = v;
        }
        for (var kk = lid / TN; kk < TK; kk += TILE_WG / TN) {
            let k = k0 + kk;
            var v = 0.0;
            if (n < n_len && k < k_len) {
                v = x_at(base, y0, x0, k);
            }
            Bs[kk * TN + bn] = v;
        }
        workgroupBarrier();
        mma(&acc, tm, tn);
        workgroupBarrier();
    }

    for (var i = 0u; i < 4u; i++) {
        let m = m0 + tm + i * WG_M;
        if (m >= m_len) {
            break;
        }
        var bv = 0.0;
        if (p.has_bias != 0u) {
            bv = bias[m];
        }
        for (var j = 0u; j < 4u; j++) {
            let nj = n0 + tn + j * WG_N;
            if (nj < n_len) {
                let bj = nj / ohw;
                let at = (bj * m_len + m) * ohw + nj - bj * ohw;
                var v = acc[i][j] + bv;
                if ((p.epilogue & 1u) != 0u) {
                    v += add[bj * m_len + m];
                }
                if ((p.epilogue & 2u) != 0u) {
                    v += residual[at];
                }
                y[at] = v;
            }
        }
    }
}

// dx = W^T dY in gather form: tile rows are input channels ci, columns input pixels
// (b, iy, ix), reduction over k = (co, ky, kx). dY[k, n] = dy[b, co, oy, ox] where
// oy s = iy + pt - ky and ox s = ix + pl - kx divide exactly and fall inside the output.
@compute @workgroup_size(TILE_WG)
fn conv2d_bwd_input(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let m_len = p.cin;
    let hw = p.h * p.w;
    let n_len = p.batch * hw;
    let khw = p.kh * p.kw;
    let k_len = p.cout * khw;
    let tiles_m = (m_len + TM - 1u) / TM;
    let tile = wid.x + wid.y * nwg.x;
    if (tile >= tiles_m * ((n_len + TN - 1u) / TN)) {
        return;
    }
    let m0 = (tile % tiles_m) * TM;
    let n0 = (tile / tiles_m) * TN;

    let bn = lid % TN;
    let n = n0 + bn;
    let b = n / hw;
    let pix = n - b * hw;
    let iy = pix / p.w;
    let ty0 = i32(iy + p.pad_top);
    let tx0 = i32(pix - iy * p.w + p.pad_left);
    let s = i32(p.stride);
    let dy_base = b * p.cout * p.ho * p.wo;
    let ak = lid % TK;

    let tm = lid / WG_N;
    let tn = lid % WG_N;
    var acc: array<vec4<f32>, 4>;
    for (var k0 = 0u; k0 < k_len; k0 += TK) {
        // A[ci, (co, ky, kx)] = w[co, ci, ky, kx]
        for (var mm = lid / TK; mm < TM; mm += TILE_WG / TK) {
            let m = m0 + mm;
            let k = k0 + ak;
            var v = 0.0;
            if (m < m_len && k < k_len) {
                let co = k / khw;
                v = w[(co * p.cin + m) * khw + k - co * khw];
            }
            As[ak * TM + mm] = v;
        }
        for (var kk = lid / TN; kk < TK; kk += TILE_WG / TN) {
            let k = k0 + kk;
            var v = 0.0;
            if (n < n_len && k < k_len) {
                let co = k / khw;
                let r = k - co * khw;
                let ky = r / p.kw;
                let ty = ty0 - i32(ky);
                let tx = tx0 - i32(r - ky * p.kw);
                let oy = ty / s;
                let ox = tx / s;
                if (ty >= 0 && tx >= 0 && oy * s == ty && ox * s == tx
                    && oy < i32(p.ho) && ox < i32(p.wo)) {
                    v = dy_in[dy_base + (co * p.ho + u32(oy)) * p.wo + u32(ox)];
                }
            }
            Bs[kk * TN + bn] = v;
        }
        workgroupBarrier();
        mma(&acc, tm, tn);
        workgroupBarrier();
    }

    for (var i = 0u; i < 4u; i++) {
        let m = m0 + tm + i * WG_M;
        if (m >= m_len) {
            break;
        }
        for (var j = 0u; j < 4u; j++) {
            let nj = n0 + tn + j * WG_N;
            if (nj < n_len) {
                let bj = nj / hw;
                dx[(bj * m_len + m) * hw + nj - bj * hw] = acc[i][j];
            }
        }
    }
}

// One split of dW = sum_r dY[co, r] X[k, r]: tile rows are output channels, columns are
// k = (ci, ky, kx), the reduction runs over the split's output pixels r = (b, oy, ox).
// Writes the split's partial tile to dw_partial[out_offset + (s Cout + co) K + k]. The
// workgroups of the first column tile also sum the dY slabs they stage over r, the split's
// part of db, written to dw_partial[bias_offset + s Cout + co].
@compute @workgroup_size(TILE_WG)
fn conv2d_bwd_weight_partial(@builtin(workgroup_id) wid: vec3<u32>,
                             @builtin(num_workgroups) nwg: vec3<u32>,
                             @builtin(local_invocation_index) lid: u32) {
    let m_len = p.cout;
    let n_len = p.cin * p.kh * p.kw;
    let ohw = p.ho * p.wo;
    let r_len = p.batch * ohw;
    let tiles_m = (m_len + TM - 1u) / TM;
    let tiles_n = (n_len + TN - 1u) / TN;
    let tile = wid.x + wid.y * nwg.x;
    if (tile >= tiles_m * tiles_n * p.splits) {
        return;
    }
    let m0 = (tile % tiles_m) * TM;
    let n0 = ((tile / tiles_m) % tiles_n) * TN;
    let split = tile / (tiles_m * tiles_n);
    let r_begin = split * p.split_len;
    let r_end = min(r_begin + p.split_len, r_len);
    let sums_bias = p.has_bias != 0u && n0 == 0u;
    var bias_sum = 0.0;

    // Both slabs are loaded with the reduction index fastest (consecutive pixels).
    let rr = lid % TK;
    let tm = lid / WG_N;
    let tn = lid % WG_N;
    var acc: array<vec4<f32>, 4>;
    for (var r0 = r_begin; r0 < r_end; r0 += TK) {
        let r = r0 + rr;
        let live = r < r_end;
        let b = r / ohw;
        let pix = r - b * ohw;
        let oy = pix / p.wo;
        let y0 = i32(oy * p.stride) - i32(p.pad_top);
        let x0 = i32((pix - oy * p.wo) * p.stride) - i32(p.pad_left);
        let base = b * p.cin * p.h * p.w;
        for (var mm = lid / TK; mm < TM; mm += TILE_WG / TK) {
            let m = m0 + mm;
            var v = 0.0;
            if (live && m < m_len) {
                v = dy_w[(b * m_len + m) * ohw + pix];
            }
            As[rr * TM + mm] = v;
        }
        for (var nn = lid / TK; nn < TN; nn += TILE_WG / TK) {
            let k = n0 + nn;
            var v = 0.0;
            if (live && k < n_len) {
                v = x_at(base, y0, x0, k);
            }
            Bs[rr * TN + nn] = v;
        }
        workgroupBarrier();
        if (sums_bias && lid < TM) {
            for (var kk = 0u; kk < TK; kk++) {
                bias_sum += As[kk * TM + lid];
            }
        }
        mma(&acc, tm, tn);
        workgroupBarrier();
    }

    if (sums_bias && lid < TM && m0 + lid < m_len) {
        dw_partial[p.bias_offset + split * m_len + m0 + lid] = bias_sum;
    }
    let out = p.out_offset + split * m_len * n_len;
    for (var i = 0u; i < 4u; i++) {
        let m = m0 + tm + i * WG_M;
        if (m >= m_len) {
            break;
        }
        for (var j = 0u; j < 4u; j++) {
            let nj = n0 + tn + j * WG_N;
            if (nj < n_len) {
                dw_partial[out + m * n_len + nj] = acc[i][j];
            }
        }
    }
}
