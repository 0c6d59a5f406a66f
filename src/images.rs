//! Turning samples into pictures: pixels from [-1, 1], image grids, atomic PNG files.

use std::io::Write;
use std::path::Path;

use image::{DynamicImage, GrayImage, RgbImage};

use crate::checkpoint::write_atomic;
use crate::error::{Error, Result};

/// `[-1, 1] -> [0, 255]`, rounded and clamped (diffusers' `(x / 2 + 0.5).clamp(0, 1) * 255`).
pub fn to_u8(x: f32) -> u8 {
    ((x * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8
}

/// One `[C, S, S]` image (C = 1 or 3) as a picture.
pub fn picture(data: &[f32], channels: usize, size: usize) -> Result<DynamicImage> {
    let px = size * size;
    if data.len() != channels * px {
        return Err(Error::invalid(
            "picture",
            format!("{} values for a {channels}x{size}x{size} image", data.len()),
        ));
    }
    match channels {
        1 => {
            let raw = data.iter().map(|&x| to_u8(x)).collect();
            Ok(DynamicImage::ImageLuma8(
                GrayImage::from_raw(size as u32, size as u32, raw).expect("sized buffer"),
            ))
        }
        3 => {
            let raw = (0..px)
                .flat_map(|i| (0..3).map(move |c| to_u8(data[c * px + i])))
                .collect();
            Ok(DynamicImage::ImageRgb8(
                RgbImage::from_raw(size as u32, size as u32, raw).expect("sized buffer"),
            ))
        }
        c => Err(Error::invalid(
            "picture",
            format!("{c} channels cannot be shown; pictures have 1 (gray) or 3 (RGB)"),
        )),
    }
}

/// `n` images `[n, C, S, S]` tiled `cols` to a row with a 2-pixel gap, as RGB.
pub fn grid(data: &[f32], n: usize, channels: usize, size: usize, cols: usize) -> Result<RgbImage> {
    const GAP: usize = 2;
    let cols = cols.clamp(1, n.max(1));
    let rows = n.div_ceil(cols);
    let (w, h) = (cols * (size + GAP) + GAP, rows * (size + GAP) + GAP);
    let mut out = RgbImage::from_pixel(w as u32, h as u32, image::Rgb([0, 0, 0]));
    let per = channels * size * size;
    if data.len() != n * per {
        return Err(Error::invalid(
            "grid",
            format!(
                "{} values for {n} images of {channels}x{size}x{size}",
                data.len()
            ),
        ));
    }
    for i in 0..n {
        let img = picture(&data[i * per..(i + 1) * per], channels, size)?.to_rgb8();
        let (x0, y0) = (
            GAP + (i % cols) * (size + GAP),
            GAP + (i / cols) * (size + GAP),
        );
        image::imageops::replace(&mut out, &img, x0 as i64, y0 as i64);
    }
    Ok(out)
}

/// The number of columns of a near-square grid of `n` images.
pub fn grid_columns(n: usize) -> usize {
    (n as f64).sqrt().ceil().max(1.0) as usize
}

/// Writes a PNG atomically (as checkpoints are written): a reader never sees half a file.
pub fn save_png(img: &DynamicImage, path: &Path) -> Result<()> {
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png)
        .map_err(|e| {
            Error::invalid("save_png", format!("cannot encode {}: {e}", path.display()))
        })?;
    write_file(path, &png.into_inner())
}

/// Writes `bytes` to `path` atomically, creating its folder.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    write_atomic(path, |out| out.write_all(bytes)).map_err(|e| match e {
        Error::Checkpoint { path, msg } => Error::invalid("write image", format!("{path}: {msg}")),
        other => other,
    })
}

/// Writes an animated GIF (looping, `delay_ms` per frame) atomically, like [`save_png`].
pub fn save_gif(frames: &[RgbImage], delay_ms: u32, path: &Path) -> Result<()> {
    use image::codecs::gif::{GifEncoder, Repeat};
    let fail = |e: image::ImageError| {
        Error::invalid("save_gif", format!("cannot encode {}: {e}", path.display()))
    };
    let mut bytes = Vec::new();
    {
        let mut gif = GifEncoder::new_with_speed(&mut bytes, 10);
        gif.set_repeat(Repeat::Infinite).map_err(fail)?;
        let delay = image::Delay::from_numer_denom_ms(delay_ms, 1);
        for f in frames {
            let rgba = DynamicImage::ImageRgb8(f.clone()).to_rgba8();
            gif.encode_frame(image::Frame::from_parts(rgba, 0, 0, delay))
                .map_err(fail)?;
        }
    }
    write_file(path, &bytes)
}
