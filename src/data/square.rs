//! Making any image a `size` x `size` square of planar pixels in [-1, 1].
//!
//! The loaders decode into [`Planes`] of f32 in [0, 1], so that resampling never rounds to
//! 8 bits, then pad, crop and resize them and append their pixels to a dataset. Shrinking
//! averages areas: each output pixel is the mean of the source pixels it covers, weighted by
//! how much of each it covers (32 x 32 to 16 x 16 is the mean of each 2 x 2 block), so thin
//! strokes fade evenly rather than vanish. Enlarging interpolates bilinearly.

/// An image as `channels` planes of `height` x `width` values in [0, 1], each plane
/// row-major.
pub(crate) struct Planes {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub data: Vec<f32>,
}

/// The source pixels one output pixel is made of: `weights[k]` of source pixel `first + k`.
struct Tap {
    first: usize,
    weights: Vec<f32>,
}

/// How each of `n_out` pixels of a row (or column) is resampled from `n_in` pixels, both
/// at least 1. Output pixel `o` spans source coordinates `[o s, (o + 1) s)`, `s = n_in / n_out`.
fn taps(n_in: usize, n_out: usize) -> Vec<Tap> {
    let scale = n_in as f64 / n_out as f64;
    (0..n_out)
        .map(|o| {
            if scale >= 1.0 {
                // Area average: each source pixel [i, i + 1) weighs its overlap with the span.
                let (lo, hi) = (o as f64 * scale, (o + 1) as f64 * scale);
                let first = lo.floor() as usize;
                let last = (hi.ceil() as usize).min(n_in);
                let weights = (first..last)
                    .map(|i| ((hi.min(i as f64 + 1.0) - lo.max(i as f64)) / scale) as f32)
                    .collect();
                Tap { first, weights }
            } else if n_in == 1 {
                Tap {
                    first: 0,
                    weights: vec![1.0],
                }
            } else {
                // Bilinear: sample at the span's center, source pixel centers at i + 1/2.
                let center = ((o as f64 + 0.5) * scale - 0.5).clamp(0.0, (n_in - 1) as f64);
                let first = (center.floor() as usize).min(n_in - 2);
                let t = center - first as f64;
                Tap {
                    first,
                    weights: vec![(1.0 - t) as f32, t as f32],
                }
            }
        })
        .collect()
}

impl Planes {
    /// Planes from `channels` interleaved values per pixel, row after row.
    pub fn from_interleaved(
        width: usize,
        height: usize,
        channels: usize,
        pixels: &[f32],
    ) -> Planes {
        let data = (0..channels)
            .flat_map(|c| pixels.iter().skip(c).step_by(channels).copied())
            .collect();
        Planes {
            channels,
            height,
            width,
            data,
        }
    }

    /// Plane `c`.
    fn plane(&self, c: usize) -> &[f32] {
        let n = self.width * self.height;
        &self.data[c * n..(c + 1) * n]
    }

    /// The image with a black (0) border of `border` pixels on every side.
    pub fn pad(&self, border: usize) -> Planes {
        let (width, height) = (self.width + 2 * border, self.height + 2 * border);
        let mut data = vec![0.0; self.channels * width * height];
        for c in 0..self.channels {
            for (y, row) in self.plane(c).chunks_exact(self.width).enumerate() {
                let start = (c * height + y + border) * width + border;
                data[start..start + self.width].copy_from_slice(row);
            }
        }
        Planes {
            channels: self.channels,
            height,
            width,
            data,
        }
    }

    /// The largest centered square of the image, resampled to `size` x `size`: "resize the
    /// shorter side to `size`, then center-crop", cropping first so that the result is
    /// exactly square. `size` and both sides are at least 1.
    pub fn fit(&self, size: usize) -> Planes {
        let side = self.width.min(self.height);
        let (x0, y0) = ((self.width - side) / 2, (self.height - side) / 2);
        let taps = taps(side, size);
        let mut data = Vec::with_capacity(self.channels * size * size);
        // Each channel: rows of the crop resampled to `size` wide, then columns.
        let mut wide = vec![0.0; side * size];
        for c in 0..self.channels {
            let plane = self.plane(c);
            for y in 0..side {
                let row = &plane[(y0 + y) * self.width + x0..][..side];
                for (x, tap) in taps.iter().enumerate() {
                    wide[y * size + x] = (tap.weights.iter().enumerate())
                        .map(|(k, w)| w * row[tap.first + k])
                        .sum();
                }
            }
            for tap in &taps {
                data.extend((0..size).map(|x| {
                    (tap.weights.iter().enumerate())
                        .map(|(k, w)| w * wide[(tap.first + k) * size + x])
                        .sum::<f32>()
                }));
            }
        }
        Planes {
            channels: self.channels,
            height: size,
            width: size,
            data,
        }
    }

    /// Appends the image to `out` as `channels` planes, each value `v` stored as `2 v - 1`,
    /// clamped to [-1, 1]. A one-channel image is repeated into every plane (gray to RGB);
    /// otherwise the image has `channels` channels.
    pub fn append_scaled(&self, channels: usize, out: &mut Vec<f32>) {
        for c in 0..channels {
            let plane = self.plane(c.min(self.channels - 1));
            out.extend(plane.iter().map(|v| (v * 2.0 - 1.0).clamp(-1.0, 1.0)));
        }
    }
}
