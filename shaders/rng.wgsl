// Counter-based random fills, the WGSL mirror of src/rng.rs (read it for the stream layout).
// Philox4x32-10 (Salmon et al. 2011) with the 32x32 -> 64-bit products built from 16-bit
// halves, since WGSL has no 64-bit integers. One invocation per Philox block of four
// elements, WG per workgroup, workgroups as an x-by-y grid (linear = wid.x + wid.y * nwg.x).
//   rand_uniform: y = (bits >> 8) 2^-24
//   randn:        Box-Muller on word pairs (0, 1) and (2, 3) of each block

override WG: u32 = 256u;

struct Params {
    // Values to write.
    n: u32,
    // Position of element 0 inside its block (offset % 4).
    first: u32,
    // Block of element 0 (offset / 4), low and high 32 bits.
    block_lo: u32,
    block_hi: u32,
    // The seed, low and high 32 bits.
    key0: u32,
    key1: u32,
    // Counter word 2: 0 for the uniform stream, 1 for the normal stream.
    stream: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;

const PHILOX_M0: u32 = 0xD2511F53u;
const PHILOX_M1: u32 = 0xCD9E8D57u;
const PHILOX_W0: u32 = 0x9E3779B9u;
const PHILOX_W1: u32 = 0xBB67AE85u;

// (high, low) 32 bits of the 64-bit product a * b, from the four 16 x 16 -> 32-bit products.
fn mulhilo(a: u32, b: u32) -> vec2<u32> {
    let a0 = a & 0xffffu;
    let a1 = a >> 16u;
    let b0 = b & 0xffffu;
    let b1 = b >> 16u;
    let p00 = a0 * b0;
    let p01 = a0 * b1;
    let p10 = a1 * b0;
    let p11 = a1 * b1;
    // Bits 16..48 of the product before the carry out of bit 32 (at most 3 * 0xffff).
    let mid = (p00 >> 16u) + (p01 & 0xffffu) + (p10 & 0xffffu);
    let hi = p11 + (p01 >> 16u) + (p10 >> 16u) + (mid >> 16u);
    return vec2<u32>(hi, a * b);
}

// Philox4x32-10: ten rounds of (c0, c1, c2, c3) -> (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2),
// hi(M0 c0) ^ c3 ^ k1, lo(M0 c0)), the key bumped by the Weyl constants between rounds.
fn philox4x32(counter: vec4<u32>, key: vec2<u32>) -> vec4<u32> {
    var c = counter;
    var k = key;
    for (var round = 0u; round < 10u; round++) {
        if (round > 0u) {
            k = k + vec2<u32>(PHILOX_W0, PHILOX_W1);
        }
        let m0 = mulhilo(PHILOX_M0, c.x);
        let m1 = mulhilo(PHILOX_M1, c.z);
        c = vec4<u32>(m1.x ^ c.y ^ k.x, m1.y, m0.x ^ c.w ^ k.y, m0.y);
    }
    return c;
}

// The words of block (block_lo, block_hi) + k: a 64-bit add with carry.
fn block_words(k: u32) -> vec4<u32> {
    let lo = p.block_lo + k;
    let hi = p.block_hi + select(0u, 1u, lo < k);
    return philox4x32(vec4<u32>(lo, hi, p.stream, 0u), vec2<u32>(p.key0, p.key1));
}

// The 24 high bits as a float in [0, 1), exactly.
fn uniform_from_bits(bits: u32) -> f32 {
    return f32(bits >> 8u) * (1.0 / 16777216.0);
}

// -2 ln u for u in (0, 1]: u = m 2^e with m in [sqrt(1/2), sqrt(2)),
// ln m = 2 atanh(s) = 2 (s + s^3/3 + ...), s = (m - 1) / (m + 1); accurate to an ulp near
// u = 1, where the builtin log is only accurate to an absolute 2^-21.
fn neg_two_ln(u: f32) -> f32 {
    let bits = bitcast<u32>(u);
    var e = i32((bits >> 23u) & 0xffu) - 127;
    var m = bitcast<f32>((bits & 0x007fffffu) | 0x3f800000u);
    if (m > 1.41421356237) {
        m = m * 0.5;
        e = e + 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let series = 1.0
        + s2 * (1.0 / 3.0
            + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0 + s2 * (1.0 / 11.0)))));
    let ln_m = 2.0 * s * series;
    // ln 2 split so that e * ln2_hi is exact.
    let ln2_hi = bitcast<f32>(0x3f317180u);
    let ln2_lo = bitcast<f32>(0x3717f7d2u);
    let ef = f32(e);
    return -2.0 * (ef * ln2_hi + (ln_m + ef * ln2_lo));
}

// (cos theta, sin theta) of theta = pi c 2^-22, c in (-2^22, 2^22): the nearest quarter turn
// q pi / 2 taken exactly (2^21 of c per quarter turn), the rest a in [-pi/4, pi/4] by
// sin_cos.wgsl (src/rng.rs mirrors this).
fn cos_sin_of_grid(c: f32) -> vec2<f32> {
    let q = round(c * (1.0 / 2097152.0));
    let a = (c - q * 2097152.0) * (3.14159265358979 / 4194304.0);
    return add_quarter_turns(cos_sin_taylor(a), i32(q));
}

// Box-Muller: r = sqrt(-2 ln u1), u1 = ((w0 >> 8) + 1) 2^-24 in (0, 1];
// theta = pi c 2^-22, c = (w1 >> 9) - 2^22 + 1/2, strictly inside (-pi, pi).
fn box_muller(w0: u32, w1: u32) -> vec2<f32> {
    let u1 = f32((w0 >> 8u) + 1u) * (1.0 / 16777216.0);
    let r = sqrt(neg_two_ln(u1));
    let centered = f32(i32(w1 >> 9u) - (1 << 22u)) + 0.5;
    return r * cos_sin_of_grid(centered);
}

// Writes the values of the k-th block that fall inside the fill.
fn store(k: u32, v: vec4<f32>) {
    for (var w = 0u; w < 4u; w++) {
        let j = k * 4u + w;
        if (j >= p.first && j - p.first < p.n) {
            y[j - p.first] = v[w];
        }
    }
}

fn block_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

fn block_count() -> u32 {
    return (p.first + p.n + 3u) / 4u;
}

@compute @workgroup_size(WG)
fn rand_uniform(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let k = block_index(wid, nwg, lid);
    if (k < block_count()) {
        let w = block_words(k);
        store(k, vec4<f32>(uniform_from_bits(w.x), uniform_from_bits(w.y),
                           uniform_from_bits(w.z), uniform_from_bits(w.w)));
    }
}

@compute @workgroup_size(WG)
fn randn(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let k = block_index(wid, nwg, lid);
    if (k < block_count()) {
        let w = block_words(k);
        store(k, vec4<f32>(box_muller(w.x, w.y), box_muller(w.z, w.w)));
    }
}
