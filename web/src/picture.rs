//! Pictures of images for the page: RGBA pixels for a canvas, or a PNG file to download.

use std::io::Cursor;

use diffwgpu::images;
use image::{DynamicImage, ImageFormat, RgbImage};
use wasm_bindgen::prelude::*;

/// An RGB picture (a grid of images).
#[wasm_bindgen]
pub struct Picture {
    image: RgbImage,
}

impl Picture {
    /// `n` images `[n, C, S, S]` in [-1, 1] as a near-square grid.
    pub(crate) fn grid(
        data: &[f32],
        n: usize,
        channels: usize,
        size: usize,
    ) -> diffwgpu::Result<Self> {
        let image = images::grid(data, n, channels, size, images::grid_columns(n))?;
        Ok(Picture { image })
    }
}

#[wasm_bindgen]
impl Picture {
    pub fn width(&self) -> u32 {
        self.image.width()
    }

    pub fn height(&self) -> u32 {
        self.image.height()
    }

    /// The pixels as RGBA8, row after row (what a canvas's `ImageData` takes).
    pub fn rgba(&self) -> Vec<u8> {
        DynamicImage::ImageRgb8(self.image.clone())
            .to_rgba8()
            .into_raw()
    }

    /// The picture as a PNG file.
    pub fn png(&self) -> Result<Vec<u8>, JsError> {
        let mut out = Cursor::new(Vec::new());
        self.image
            .write_to(&mut out, ImageFormat::Png)
            .map_err(|e| JsError::new(&format!("encoding the PNG failed: {e}")))?;
        Ok(out.into_inner())
    }
}
