// Multi-head scaled dot-product attention over packed projections, flash-attention style: the
// L x L score matrix is never stored; each workgroup streams blocks of keys (or queries)
// through workgroup memory.
//
// qkv is [B, L, 3C]: each row is q (C values) | k (C) | v (C), and head h owns columns
// h*d .. (h+1)*d of each, so the head's q, k and v rows are read with row stride 3C from
// columns h*d, C + h*d and 2C + h*d. O and dO are [B, L, C]; lse and D are [B, heads, L]; the
// gradient d_qkv = dQ | dK | dV is [B, L, 3C], laid out as qkv.
// Per (b, h):  S = Q K^T * scale,  scale = 1/sqrt(d),  P = exp(S - lse),  O = P V.
//
//   attention_fwd:       O and lse = m + log(l) with the online softmax: per key block,
//                        m' = max(m, rowmax S_blk), l' = l e^(m - m') + sum e^(S_blk - m'),
//                        o' = o e^(m - m') + e^(S_blk - m') V_blk, and finally O = o / l.
//   attention_bwd_delta: D_i = sum_j dO_ij O_ij.
//   attention_bwd_dq:    dS = P * (dO V^T - D), dQ = dS K * scale, per block of query rows,
//                        into the q columns of d_qkv.
//   attention_bwd_dkv:   dV = P^T dO, dK = dS^T Q * scale, per block of key rows, into the
//                        k and v columns of d_qkv.
// The two gradient passes write disjoint columns of d_qkv, their one writable binding.
//
// A workgroup of ROW_WG = BR x TPR invocations owns BR rows: invocation (r, t) = (lid / TPR,
// lid % TPR) holds row r's output columns t + TPR u (u < MAXCOL, so d <= 256) in registers, and the scores of
// row r against columns t + 16 i (i < 4) of the current BC = 64-wide block. Scores are computed
// as a small matrix product over the feature dimension in DK = 16 deep slices staged in
// workgroup memory; the row-wide softmax steps go through a [BR][BC] tile in workgroup memory.

// Workgroup size of the one-invocation-per-row pass.
override WG: u32 = 256u;

struct Params {
    len: u32,
    channels: u32,
    heads: u32,
    head_dim: u32,
    scale: f32,
    // B * heads * L.
    rows: u32,
}

override BR: u32 = 16u;
const TPR: u32 = 16u;
override ROW_WG: u32 = BR * TPR;
const BC: u32 = 64u;
const SPT: u32 = 4u;
const DK: u32 = 16u;
const MAXCOL: u32 = 16u;
// Stands in for -infinity (WGSL does not promise infinities).
const NEG_BIG: f32 = -3.0e38;

// The operands of the score products: the column blocks of qkv (and of d_qkv), and dO.
const Q: u32 = 0u;
const K: u32 = 1u;
const V: u32 = 2u;
const DO: u32 = 3u;

@group(0) @binding(0) var<uniform> p: Params;

// attention_fwd, attention_bwd_dq and attention_bwd_dkv: the packed q | k | v.
@group(0) @binding(1) var<storage, read> qkv: array<f32>;

// attention_fwd: O and lse.
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read_write> lse_out: array<f32>;

// attention_bwd_delta: O, dO (below) and D.
@group(0) @binding(1) var<storage, read> o_saved: array<f32>;
@group(0) @binding(3) var<storage, read_write> delta_out: array<f32>;

// Backward: dO at 2; the gradient passes then read lse and D and write d_qkv.
@group(0) @binding(2) var<storage, read> d_out: array<f32>;
@group(0) @binding(3) var<storage, read> lse: array<f32>;
@group(0) @binding(4) var<storage, read> delta: array<f32>;
@group(0) @binding(5) var<storage, read_write> d_qkv: array<f32>;

var<workgroup> x_tile: array<f32, DK * BR>;   // [DK][BR]
var<workgroup> y_tile: array<f32, DK * BC>;   // [DK][BC]
var<workgroup> s_tile: array<f32, BR * BC>;   // [BR][BC]: scores, P or dS of the block
var<workgroup> p_tile: array<f32, BR * BC>;   // [BR][BC]: P of the block (dK/dV pass)

// Element (row 0, feature 0) of this workgroup's (b, head) in qkv's q columns, and in O / dO.
var<private> qkv_base: u32;
var<private> o_base: u32;
// This workgroup's (b, head) rows in lse and D: lse[bh_rows + i].
var<private> bh_rows: u32;
var<private> s: array<f32, SPT>;

fn setup(bh: u32) {
    let b = bh / p.heads;
    let h = bh % p.heads;
    qkv_base = b * p.len * 3u * p.channels + h * p.head_dim;
    o_base = b * p.len * p.channels + h * p.head_dim;
    bh_rows = bh * p.len;
}

// Where element (row, f) of this head's q, k or v (`part`) lives in qkv, and its gradient in
// d_qkv.
fn qkv_at(part: u32, row: u32, f: u32) -> u32 {
    return qkv_base + row * 3u * p.channels + part * p.channels + f;
}

// Where element (row, f) of this head lives in O and dO.
fn o_at(row: u32, f: u32) -> u32 {
    return o_base + row * p.channels + f;
}

fn inside(row: u32, f: u32) -> bool {
    return row < p.len && f < p.head_dim;
}

// Element (row, f) of this head's q, k or v; 0 outside [L, d].
fn load_qkv(part: u32, row: u32, f: u32) -> f32 {
    if (inside(row, f)) {
        return qkv[qkv_at(part, row, f)];
    }
    return 0.0;
}

// Element (row, f) of this head's q, k, v or dO (part DO); 0 outside [L, d]. Backward only:
// the forward binds no dO.
fn load(part: u32, row: u32, f: u32) -> f32 {
    if (part != DO) {
        return load_qkv(part, row, f);
    }
    if (inside(row, f)) {
        return d_out[o_at(row, f)];
    }
    return 0.0;
}

// Index in the tiles of slice element e: x holds BR x DK (one per invocation), y BC x DK
// (SPT per invocation); consecutive invocations take consecutive features of a row.
fn tile_row(e: u32) -> u32 {
    return e / DK;
}

fn tile_depth(e: u32) -> u32 {
    return e % DK;
}

fn stage_x(e: u32, v: f32) {
    x_tile[tile_depth(e) * BR + tile_row(e)] = v;
}

fn stage_y(e: u32, v: f32) {
    y_tile[tile_depth(e) * BC + tile_row(e)] = v;
}

fn clear_scores() {
    for (var i = 0u; i < SPT; i++) {
        s[i] = 0.0;
    }
}

// s[i] += sum_l x_tile[l][r] * y_tile[l][t + TPR i] over one staged slice.
fn accumulate_slice(lid: u32) {
    let r = lid / TPR;
    let t = lid % TPR;
    for (var l = 0u; l < DK; l++) {
        let xv = x_tile[l * BR + r];
        for (var i = 0u; i < SPT; i++) {
            s[i] = fma(xv, y_tile[l * BC + t + TPR * i], s[i]);
        }
    }
}

// s[i] = q[row0 + r] . k[col0 + t + TPR i] over the d features of the head.
fn scores_fwd(lid: u32, row0: u32, col0: u32) {
    clear_scores();
    for (var d0 = 0u; d0 < p.head_dim; d0 += DK) {
        stage_x(lid, load_qkv(Q, row0 + tile_row(lid), d0 + tile_depth(lid)));
        for (var e = lid; e < BC * DK; e += ROW_WG) {
            stage_y(e, load_qkv(K, col0 + tile_row(e), d0 + tile_depth(e)));
        }
        workgroupBarrier();
        accumulate_slice(lid);
        workgroupBarrier();
    }
}

// s[i] = x[row0 + r] . y[col0 + t + TPR i] for parts x and y: (q, k) and (dO, v) in the dQ
// pass, (k, q) and (v, dO) in the dK/dV pass.
fn scores(lid: u32, row0: u32, col0: u32, x: u32, y: u32) {
    clear_scores();
    for (var d0 = 0u; d0 < p.head_dim; d0 += DK) {
        stage_x(lid, load(x, row0 + tile_row(lid), d0 + tile_depth(lid)));
        for (var e = lid; e < BC * DK; e += ROW_WG) {
            stage_y(e, load(y, col0 + tile_row(e), d0 + tile_depth(e)));
        }
        workgroupBarrier();
        accumulate_slice(lid);
        workgroupBarrier();
    }
}

@compute @workgroup_size(ROW_WG)
fn attention_fwd(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    setup(wid.y);
    let r = lid / TPR;
    let t = lid % TPR;
    let row0 = wid.x * BR;
    var m = NEG_BIG;
    var l = 0.0;
    var o: array<f32, MAXCOL>;
    for (var u = 0u; u < MAXCOL; u++) {
        o[u] = 0.0;
    }
    for (var col0 = 0u; col0 < p.len; col0 += BC) {
        scores_fwd(lid, row0, col0);
        for (var i = 0u; i < SPT; i++) {
            let c = t + TPR * i;
            s[i] = select(NEG_BIG, s[i] * p.scale, col0 + c < p.len);
            s_tile[r * BC + c] = s[i];
        }
        workgroupBarrier();
        var m_new = m;
        for (var c = 0u; c < BC; c++) {
            m_new = max(m_new, s_tile[r * BC + c]);
        }
        let alpha = exp(m - m_new);
        workgroupBarrier();
        for (var i = 0u; i < SPT; i++) {
            let c = t + TPR * i;
            s_tile[r * BC + c] = select(0.0, exp(s[i] - m_new), col0 + c < p.len);
        }
        workgroupBarrier();
        l *= alpha;
        for (var u = 0u; u < MAXCOL; u++) {
            o[u] *= alpha;
        }
        let keys = min(BC, p.len - col0);
        for (var c = 0u; c < keys; c++) {
            let pc = s_tile[r * BC + c];
            l += pc;
            for (var u = 0u; u < MAXCOL; u++) {
                let j = t + TPR * u;
                if (j < p.head_dim) {
                    o[u] = fma(pc, qkv[qkv_at(V, col0 + c, j)], o[u]);
                }
            }
        }
        m = m_new;
        workgroupBarrier();
    }
    let row = row0 + r;
    if (row < p.len) {
        for (var u = 0u; u < MAXCOL; u++) {
            let j = t + TPR * u;
            if (j < p.head_dim) {
                out[o_at(row, j)] = o[u] / l;
            }
        }
        if (t == 0u) {
            lse_out[bh_rows + row] = m + log(l);
        }
    }
}

// One invocation per (b, head, row), WG per workgroup on an x-by-y grid.
@compute @workgroup_size(WG)
fn attention_bwd_delta(@builtin(workgroup_id) wid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>,
                       @builtin(local_invocation_index) lid: u32) {
    let idx = (wid.x + wid.y * nwg.x) * WG + lid;
    if (idx < p.rows) {
        let bh = idx / p.len;
        let i = idx % p.len;
        setup(bh);
        var sum = 0.0;
        for (var j = 0u; j < p.head_dim; j++) {
            sum = fma(d_out[o_at(i, j)], o_saved[o_at(i, j)], sum);
        }
        delta_out[idx] = sum;
    }
}

@compute @workgroup_size(ROW_WG)
fn attention_bwd_dq(@builtin(workgroup_id) wid: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    setup(wid.y);
    let r = lid / TPR;
    let t = lid % TPR;
    let row0 = wid.x * BR;
    let row = row0 + r;
    var lse_r = 0.0;
    var delta_r = 0.0;
    if (row < p.len) {
        lse_r = lse[bh_rows + row];
        delta_r = delta[bh_rows + row];
    }
    var dq: array<f32, MAXCOL>;
    for (var u = 0u; u < MAXCOL; u++) {
        dq[u] = 0.0;
    }
    var scaled: array<f32, SPT>;
    for (var col0 = 0u; col0 < p.len; col0 += BC) {
        scores(lid, row0, col0, Q, K);
        for (var i = 0u; i < SPT; i++) {
            scaled[i] = s[i] * p.scale;
        }
        scores(lid, row0, col0, DO, V);
        for (var i = 0u; i < SPT; i++) {
            let c = t + TPR * i;
            let prob = exp(scaled[i] - lse_r);
            s_tile[r * BC + c] = select(0.0, prob * (s[i] - delta_r), col0 + c < p.len && row < p.len);
        }
        workgroupBarrier();
        let keys = min(BC, p.len - col0);
        for (var c = 0u; c < keys; c++) {
            let ds = s_tile[r * BC + c];
            for (var u = 0u; u < MAXCOL; u++) {
                let j = t + TPR * u;
                if (j < p.head_dim) {
                    dq[u] = fma(ds, qkv[qkv_at(K, col0 + c, j)], dq[u]);
                }
            }
        }
        workgroupBarrier();
    }
    if (row < p.len) {
        for (var u = 0u; u < MAXCOL; u++) {
            let j = t + TPR * u;
            if (j < p.head_dim) {
                d_qkv[qkv_at(Q, row, j)] = dq[u] * p.scale;
            }
        }
    }
}

// Rows of this workgroup are keys; the streamed blocks are queries.
@compute @workgroup_size(ROW_WG)
fn attention_bwd_dkv(@builtin(workgroup_id) wid: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    setup(wid.y);
    let r = lid / TPR;
    let t = lid % TPR;
    let row0 = wid.x * BR;
    let row = row0 + r;
    var dk: array<f32, MAXCOL>;
    var dv: array<f32, MAXCOL>;
    for (var u = 0u; u < MAXCOL; u++) {
        dk[u] = 0.0;
        dv[u] = 0.0;
    }
    var scaled: array<f32, SPT>;
    for (var col0 = 0u; col0 < p.len; col0 += BC) {
        scores(lid, row0, col0, K, Q);
        for (var i = 0u; i < SPT; i++) {
            scaled[i] = s[i] * p.scale;
        }
        scores(lid, row0, col0, V, DO);
        for (var i = 0u; i < SPT; i++) {
            let c = t + TPR * i;
            let query = col0 + c;
            var prob = 0.0;
            var ds = 0.0;
            if (query < p.len && row < p.len) {
                prob = exp(scaled[i] - lse[bh_rows + query]);
                ds = prob * (s[i] - delta[bh_rows + query]);
            }
            p_tile[r * BC + c] = prob;
            s_tile[r * BC + c] = ds;
        }
        workgroupBarrier();
        let queries = min(BC, p.len - col0);
        for (var c = 0u; c < queries; c++) {
            let prob = p_tile[r * BC + c];
            let ds = s_tile[r * BC + c];
            for (var u = 0u; u < MAXCOL; u++) {
                let j = t + TPR * u;
                if (j < p.head_dim) {
                    dv[u] = fma(prob, d_out[o_at(col0 + c, j)], dv[u]);
                    dk[u] = fma(ds, qkv[qkv_at(Q, col0 + c, j)], dk[u]);
                }
            }
        }
        workgroupBarrier();
    }
    if (row < p.len) {
        for (var u = 0u; u < MAXCOL; u++) {
            let j = t + TPR * u;
            if (j < p.head_dim) {
                d_qkv[qkv_at(K, row, j)] = dk[u] * p.scale;
                d_qkv[qkv_at(V, row, j)] = dv[u];
            }
        }
    }
}
