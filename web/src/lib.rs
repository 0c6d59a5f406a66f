//! diffwgpu in a web page: the library's GPU backend on the browser's WebGPU, driven from
//! JavaScript. `openGpu()` gives the device; `Training` trains a preset on the embedded
//! digits; `Model` samples from a trained model or a pipeline folder the user loads.
//!
//! A page may not block, so every call that reads the GPU returns a `Promise`. Calls on one
//! object must not overlap: each object refuses a call while its previous one runs.

// That refusal is a `RefCell` borrowed across the call's awaits on purpose: the borrow is the
// object's busy flag, and every other call takes it with `try_borrow_mut` (see `exclusive`),
// so an overlapping call gets an error, never a panic.
#![allow(clippy::await_holding_refcell_ref)]

mod model;
mod picture;
mod training;
mod zip;

use std::cell::{RefCell, RefMut};
use std::rc::Rc;

use diffwgpu::Gpu;
use wasm_bindgen::prelude::*;

pub use model::{Model, Sampling};
pub use picture::Picture;
pub use training::Training;

/// Panics reach the browser's console with their message instead of "unreachable".
#[wasm_bindgen(start)]
fn start() {
    std::panic::set_hook(Box::new(|info| {
        web_sys::console::error_1(&JsValue::from_str(&format!("diffwgpu: {info}")));
    }));
}

/// The page's GPU: the adapter WebGPU gave, with the device the kernels run on.
#[wasm_bindgen(js_name = Gpu)]
pub struct WebGpu {
    gpu: &'static Gpu,
}

#[wasm_bindgen(js_class = Gpu)]
impl WebGpu {
    /// The adapter's name (browsers may keep it to themselves), API and kind.
    pub fn adapter(&self) -> String {
        let info = self.gpu.adapter_info();
        let name = match info.name.is_empty() {
            true => "WebGPU adapter",
            false => info.name.as_str(),
        };
        format!("{name} ({:?}, {:?})", info.backend, info.device_type)
    }

    /// Builds the pipeline of every kernel of the library, so that the browser's shader
    /// compiler checks them all; resolves to their number, or rejects with its first error.
    #[wasm_bindgen(js_name = checkKernels)]
    pub fn check_kernels(&self) -> js_sys::Promise {
        let gpu = self.gpu;
        promise(async move {
            let kernels = diffwgpu::ops::gpu_kernels();
            gpu.build_pipelines_async(&kernels).await?;
            Ok(kernels.len() as u32)
        })
    }
}

/// Requests the browser's WebGPU adapter and a device with WebGPU's default limits (every
/// kernel is written for them). The device lives as long as the page.
#[wasm_bindgen(js_name = openGpu)]
pub async fn open_gpu() -> Result<WebGpu, JsError> {
    let gpu = Gpu::request().await.map_err(js_error)?;
    Ok(WebGpu {
        gpu: Box::leak(Box::new(gpu)),
    })
}

/// A library error as a JavaScript `Error` with its message.
fn js_error(e: diffwgpu::Error) -> JsError {
    JsError::new(&e.to_string())
}

/// `f`'s future as a `Promise`: its value, or a rejection with the error's message.
fn promise<T, F>(f: F) -> js_sys::Promise
where
    T: Into<JsValue>,
    F: std::future::Future<Output = diffwgpu::Result<T>> + 'static,
{
    wasm_bindgen_futures::future_to_promise(async move {
        f.await
            .map(Into::into)
            .map_err(|e| JsError::new(&e.to_string()).into())
    })
}

/// Mutable access to an object's state, or an error while another call on it is running.
fn exclusive<'a, T>(cell: &'a Rc<RefCell<T>>, what: &str) -> diffwgpu::Result<RefMut<'a, T>> {
    cell.try_borrow_mut().map_err(|_| {
        diffwgpu::Error::invalid(
            "web page",
            format!("the {what} is busy with an earlier call; await it before the next"),
        )
    })
}
