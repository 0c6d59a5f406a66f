//! How well a model fits data, in bits per dimension: DDPM's variational bound on the
//! negative log-likelihood (`terms`, `bound`), and the exact likelihood of the
//! probability-flow ODE (`ode`).

pub mod bound;
pub mod ode;
pub mod terms;

pub use bound::{variational_bound, BoundEstimate, TermStats, Terms};
pub use ode::ode_log_likelihood;
pub use terms::{bits_per_dim, Decoder, VariationalBound};

use crate::diffusion::Denoiser;
use crate::error::{Error, Result};

/// The model's image shape, its number of values and how many images `images` holds: a
/// whole number, at least one.
fn image_count(
    op: &'static str,
    model: &dyn Denoiser,
    images: &[f32],
) -> Result<([usize; 3], usize, usize)> {
    let shape = model.image_shape();
    let dims: usize = shape.iter().product();
    let n = images.len() / dims.max(1);
    if n == 0 || images.len() != n * dims {
        return Err(Error::invalid(
            op,
            format!(
                "{} values are not a whole number of images of {shape:?}, at least one",
                images.len()
            ),
        ));
    }
    Ok((shape, dims, n))
}

/// A mean over samples and its standard error (`NaN` with fewer than two samples).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    pub mean: f64,
    pub std_error: f64,
    pub n: usize,
}

impl Estimate {
    /// The mean and standard error of `values`.
    pub fn of(values: impl Iterator<Item = f64>) -> Estimate {
        let (mut sum, mut sum_sq, mut n) = (0.0, 0.0, 0);
        for v in values {
            sum += v;
            sum_sq += v * v;
            n += 1;
        }
        Estimate::from_sums(sum, sum_sq, n)
    }

    /// From the sum and the sum of squares of `n` samples.
    pub fn from_sums(sum: f64, sum_sq: f64, n: usize) -> Estimate {
        let mean = sum / n as f64;
        let var = if n > 1 {
            ((sum_sq - n as f64 * mean * mean) / (n - 1) as f64).max(0.0)
        } else {
            f64::NAN
        };
        Estimate {
            mean,
            std_error: (var / n as f64).sqrt(),
            n,
        }
    }
}
