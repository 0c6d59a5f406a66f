//! Counter-based random numbers, mirrored in `shaders/rng.wgsl`.
