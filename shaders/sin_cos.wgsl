// cos and sin written out, for kernels whose results must match the CPU's to an ulp or two on
// every adapter: WGSL's builtins need only be within 2^-11 on [-pi, pi], and a software
// adapter (SwiftShader) is 2e-4 off. Prepended to the shaders that use it.

// (cos a, sin a) for |a| <= pi/4 by their Taylor series to a^10 and a^9 (truncation < 2e-9).
fn cos_sin_taylor(a: f32) -> vec2<f32> {
    let a2 = a * a;
    let s = a * (1.0 - a2 * (1.0 / 6.0)
        * (1.0 - a2 * (1.0 / 20.0) * (1.0 - a2 * (1.0 / 42.0) * (1.0 - a2 * (1.0 / 72.0)))));
    let c = 1.0 - a2 * 0.5 * (1.0 - a2 * (1.0 / 12.0) * (1.0 - a2 * (1.0 / 30.0)
        * (1.0 - a2 * (1.0 / 56.0) * (1.0 - a2 * (1.0 / 90.0)))));
    return vec2<f32>(c, s);
}

// (cos, sin) of a + q pi / 2, from cs = (cos a, sin a).
fn add_quarter_turns(cs: vec2<f32>, q: i32) -> vec2<f32> {
    switch (((q % 4) + 4) % 4) {
        case 0: { return cs; }
        case 1: { return vec2<f32>(-cs.y, cs.x); }
        case 2: { return -cs; }
        default: { return vec2<f32>(cs.y, -cs.x); }
    }
}
