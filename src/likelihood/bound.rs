//! The variational bound of a set of images: every term of every image (the bound itself, up
//! to the one draw of `x_t` per term), or for each image `K` timesteps drawn uniformly, whose
//! terms weighted by `T / K` are an unbiased estimate of their sum.
//!
//! The draws are pure functions of the seed and the image's index: `x_t` of image `i` for its
//! `d`-th term (`d = t` for every timestep, `T + k` for the `k`-th drawn one) uses the normal
//! stream at element `(d N + i) * numel(image)`, and the `k`-th drawn timestep element
//! `k N + i` of the uniform stream of `seed + 1`; batches change nothing.

use crate::backend::Backend;
use crate::diffusion::Denoiser;
use crate::error::{Error, Result};
use crate::likelihood::terms::{bits_per_dim, VariationalBound};
use crate::likelihood::{image_count, Estimate};
use crate::ops::conv2d::with_filter_cache;
use crate::rng;

/// Which terms of each image are evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Terms {
    /// All `T` of them.
    Every,
    /// `K` timesteps per image, drawn uniformly with replacement.
    Sampled(usize),
}

/// Running sums of one timestep's term over the images that evaluated it, in nats.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TermStats {
    pub sum: f64,
    pub sum_sq: f64,
    pub count: usize,
}

impl TermStats {
    fn add(&mut self, v: f64) {
        self.sum += v;
        self.sum_sq += v * v;
        self.count += 1;
    }

    /// The term's mean and standard error in bits per dimension of images of `dims` values.
    pub fn bits_per_dim(&self, dims: usize) -> Estimate {
        let to_bits = |v: f64| bits_per_dim(v, dims);
        Estimate::from_sums(to_bits(self.sum), to_bits(to_bits(self.sum_sq)), self.count)
    }
}

/// What [`variational_bound`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct BoundEstimate {
    /// Values per image.
    pub dims: usize,
    /// Per image, the bound in nats (with `Terms::Sampled`, an unbiased estimate of it).
    pub total: Vec<f64>,
    /// Per image, the prior term `L_T` in nats.
    pub prior: Vec<f64>,
    /// Per timestep (index 0 the decoder), its term over the images that evaluated it.
    pub terms: Vec<TermStats>,
}

impl BoundEstimate {
    /// The bound in bits per dimension: its mean over the images and its standard error.
    pub fn bits_per_dim(&self) -> Estimate {
        Estimate::of(self.total.iter().map(|&v| bits_per_dim(v, self.dims)))
    }

    /// The prior term in bits per dimension.
    pub fn prior_bits_per_dim(&self) -> Estimate {
        Estimate::of(self.prior.iter().map(|&v| bits_per_dim(v, self.dims)))
    }
}

/// The variational bound of `images` (NCHW values in [-1, 1], image after image) under
/// `model`, `batch` images per model evaluation; `progress` hears the images of each
/// evaluation.
#[allow(clippy::too_many_arguments)]
pub fn variational_bound(
    be: &dyn Backend,
    model: &dyn Denoiser,
    vb: &VariationalBound,
    images: &[f32],
    terms: Terms,
    seed: u64,
    batch: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<BoundEstimate> {
    let (shape, dims, n) = image_count("variational bound", model, images)?;
    let t_max = vb.timesteps()?;
    let (draws, weight) = match terms {
        Terms::Every => (t_max, 1.0),
        Terms::Sampled(0) => {
            return Err(Error::invalid(
                "variational bound",
                "0 timesteps per image estimate nothing; draw at least 1",
            ))
        }
        Terms::Sampled(k) => (k, t_max as f64 / k as f64),
    };
    let prior = images
        .chunks(dims)
        .map(|x0| vb.prior(x0))
        .collect::<Result<Vec<f64>>>()?;
    let mut total = prior.clone();
    let mut stats = vec![TermStats::default(); t_max];
    let batch = batch.clamp(1, n);
    with_filter_cache(|| -> Result<()> {
        for first in (0..n).step_by(batch) {
            let b = batch.min(n - first);
            let x0 = &images[first * dims..(first + b) * dims];
            for d in 0..draws {
                let (draw, ts): (usize, Vec<usize>) = match terms {
                    Terms::Every => (t_max - 1 - d, vec![t_max - 1 - d; b]),
                    Terms::Sampled(_) => (
                        t_max + d,
                        (first..first + b)
                            .map(|i| {
                                let u = rng::uniform(seed.wrapping_add(1), (d * n + i) as u64);
                                ((u as f64 * t_max as f64) as usize).min(t_max - 1)
                            })
                            .collect(),
                    ),
                };
                let mut x_t = vec![0.0f32; b * dims];
                rng::fill_normal(&mut x_t, seed, ((draw * n + first) * dims) as u64);
                for (i, (xt, x0)) in x_t.chunks_mut(dims).zip(x0.chunks(dims)).enumerate() {
                    let abar = vb.schedule.alphas_cumprod[ts[i]] as f64;
                    let (a, s) = (abar.sqrt(), (1.0 - abar).sqrt());
                    for (xt, &x0) in xt.iter_mut().zip(x0) {
                        *xt = (a * x0 as f64 + s * *xt as f64) as f32;
                    }
                }
                let times: Vec<f64> = ts.iter().map(|&t| t as f64).collect();
                let x = be.upload(&[b, shape[0], shape[1], shape[2]], &x_t)?;
                let out = be.to_vec(&model.predict(be, &x, &times)?)?;
                for (i, &t) in ts.iter().enumerate() {
                    let at = i * dims..(i + 1) * dims;
                    let term = vb.term(t, &x0[at.clone()], &x_t[at.clone()], &out[at])?;
                    stats[t].add(term);
                    total[first + i] += weight * term;
                }
                progress(b);
            }
        }
        Ok(())
    })?;
    Ok(BoundEstimate {
        dims,
        total,
        prior,
        terms: stats,
    })
}
