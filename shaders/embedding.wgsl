// Sinusoidal timestep embedding (diffusers' get_timestep_embedding), one invocation per output
// element of [B, dim], WG per workgroup, workgroups as an x-by-y grid.
//   y[b, j]        = sin(arg_{b,j}),        j < half   (cos when flip)
//   y[b, half + j] = cos(arg_{b,j}),        j < half   (sin when flip)
//   y[b, dim - 1]  = 0 when dim is odd;  arg_{b,k} = scale (t_b freq_k)
// with sin and cos from sin_cos.wgsl, prepended.

override WG: u32 = 256u;

struct Params {
    n: u32,
    dim: u32,
    half: u32,
    flip: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> timesteps: array<f32>;
@group(0) @binding(2) var<storage, read> freqs: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

// 2 pi = C1 + C2 + C3: C1 and C2 have 8 significant bits, so k C1 and k C2 are exact for
// |k| < 2^16 (|arg| < 4e5), and so are the first two subtractions (Sterbenz); only the last
// rounds. The result lies in [-pi, pi].
const INV_TWO_PI: f32 = 0.15915494309189535;
const C1: f32 = 6.28125;
const C2: f32 = 0.0019378662109375;
const C3: f32 = -2.559031372584286e-06;

fn reduce(x: f32) -> f32 {
    let k = round(x * INV_TWO_PI);
    return ((x - k * C1) - k * C2) - k * C3;
}

// pi / 2 = P1 + P2 with P1 of 8 significant bits: for r in [-pi, pi], q in -2..=2, q P1 and
// r - q P1 are exact, and the rest a lies in [-pi/4, pi/4] up to a rounding.
const TWO_OVER_PI: f32 = 0.6366197723675814;
const P1: f32 = 1.5703125;
const P2: f32 = 4.8382679489661923e-04;

// (cos r, sin r) for r in [-pi, pi], by sin_cos.wgsl rather than the builtins.
fn cos_sin(r: f32) -> vec2<f32> {
    let q = round(r * TWO_OVER_PI);
    let a = (r - q * P1) - q * P2;
    return add_quarter_turns(cos_sin_taylor(a), i32(q));
}

@compute @workgroup_size(WG)
fn timestep_embedding(@builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * WG + lid;
    if (i >= p.n) {
        return;
    }
    let b = i / p.dim;
    let j = i % p.dim;
    if (j >= 2u * p.half) {
        y[i] = 0.0;
        return;
    }
    let first = j < p.half;
    let k = select(j - p.half, j, first);
    let cs = cos_sin(reduce(p.scale * (timesteps[b] * freqs[k])));
    // First half sin, second cos; flipped, the other way round.
    y[i] = select(cs.x, cs.y, first != (p.flip != 0u));
}
