// Sinusoidal timestep embedding (diffusers' get_timestep_embedding), one invocation per output
// element of [B, dim], WG per workgroup, workgroups as an x-by-y grid.
//   y[b, j]        = sin(arg_{b,j}),        j < half   (cos when flip)
//   y[b, half + j] = cos(arg_{b,j}),        j < half   (sin when flip)
//   y[b, dim - 1]  = 0 when dim is odd;  arg_{b,k} = scale (t_b freq_k)

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
// rounds. The result lies in [-pi, pi], where sin and cos are accurate.
const INV_TWO_PI: f32 = 0.15915494309189535;
const C1: f32 = 6.28125;
const C2: f32 = 0.0019378662109375;
const C3: f32 = -2.559031372584286e-06;

fn reduce(x: f32) -> f32 {
    let k = round(x * INV_TWO_PI);
    return ((x - k * C1) - k * C2) - k * C3;
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
    let r = reduce(p.scale * (timesteps[b] * freqs[k]));
    // First half sin, second cos; flipped, the other way round.
    if (first != (p.flip != 0u)) {
        y[i] = sin(r);
    } else {
        y[i] = cos(r);
    }
}
