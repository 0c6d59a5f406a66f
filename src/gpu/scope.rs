//! Error scopes that answer at once. Natively the scope's answer is waited for, so a failed
//! buffer, bind group or pipeline is an `Err` naming it. In a browser that answer only arrives
//! after control returns to the page's event loop, so no scope is pushed there: the error goes
//! to the device's uncaptured-error handler and is reported at the next readback.

/// Runs `make` inside an error scope of `filter`; returns its value and the error it raised.
#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn scoped<T>(
    device: &wgpu::Device,
    filter: wgpu::ErrorFilter,
    make: impl FnOnce() -> T,
) -> (T, Option<wgpu::Error>) {
    let scope = device.push_error_scope(filter);
    let value = make();
    (value, pollster::block_on(scope.pop()))
}

/// Runs `make`; its errors reach the uncaptured-error handler (see the module's comment).
#[cfg(target_arch = "wasm32")]
pub(crate) fn scoped<T>(
    _device: &wgpu::Device,
    _filter: wgpu::ErrorFilter,
    make: impl FnOnce() -> T,
) -> (T, Option<wgpu::Error>) {
    (make(), None)
}
