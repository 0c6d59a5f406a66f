//! Parameter declarations: every layer registers its tensors here by their diffusers name, with
//! the initialisation PyTorch gives them by default.

use crate::error::{Error, Result};
use crate::rng;
use crate::tensor::Tensor;

/// How a parameter starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// `U(-bound, bound)`: PyTorch's default for conv and linear weights
    /// (`kaiming_uniform_(a = sqrt(5))`, i.e. `bound = 1 / sqrt(fan_in)`) and their biases.
    Uniform(f32),
    /// All ones (GroupNorm's scale).
    Ones,
    /// All zeros (GroupNorm's shift).
    Zeros,
    /// `N(0, std^2)`: PyTorch's default for `nn.Embedding` tables (std 1).
    Normal(f32),
}

/// One parameter: its diffusers name, shape and initialisation.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The list of parameters a model declares, in declaration order; layers keep indices into it.
#[derive(Debug, Default, Clone)]
pub struct ParamList {
    pub specs: Vec<ParamSpec>,
    /// Parameters that ops read as one tensor, stacked along their first dimension (the
    /// attention's query, key and value weights: one matrix product): each group lies in
    /// the flat layout as one contiguous block, its members in order.
    pub groups: Vec<Vec<usize>>,
    /// Parameters that lie side by side in the flat layout, each still read and differentiated
    /// as its own tensor (a group norm's scale and shift, which its kernels bind as one
    /// buffer: only the first of them starts at an aligned offset).
    pub adjacent: Vec<Vec<usize>>,
}

impl ParamList {
    /// Declares a parameter and returns its index.
    pub fn add(&mut self, name: String, shape: &[usize], init: Init) -> usize {
        self.specs.push(ParamSpec {
            name,
            shape: shape.to_vec(),
            init,
        });
        self.specs.len() - 1
    }

    /// Declares that `members` (same trailing dimensions) are read stacked as one tensor.
    pub fn group(&mut self, members: &[usize]) {
        self.groups.push(members.to_vec());
    }

    /// Declares that `members` lie side by side in the flat layout (see [`Self::adjacent`]).
    pub fn place_together(&mut self, members: &[usize]) {
        self.adjacent.push(members.to_vec());
    }

    /// Where every parameter lives in a flat buffer.
    pub fn layout(&self) -> ParamLayout {
        let mut offsets = vec![0; self.specs.len()];
        let mut placed = vec![false; self.specs.len()];
        let mut total = 0;
        for i in 0..self.specs.len() {
            if placed[i] {
                continue;
            }
            let members = self
                .groups
                .iter()
                .chain(&self.adjacent)
                .find(|g| g.contains(&i))
                .cloned()
                .unwrap_or_else(|| vec![i]);
            for m in members {
                offsets[m] = total;
                placed[m] = true;
                total += self.specs[m].numel();
            }
            total = total.next_multiple_of(PARAM_ALIGN);
        }
        ParamLayout {
            offsets,
            shapes: self.specs.iter().map(|s| s.shape.clone()).collect(),
            groups: self.groups.clone(),
            total: total.max(1),
        }
    }

    /// The total number of scalars.
    pub fn count(&self) -> usize {
        self.specs.iter().map(ParamSpec::numel).sum()
    }

    /// Initial values for every parameter, drawn from the counter-based generator: parameter
    /// `i` element `j` depends only on `(seed, i, j)`, so the same seed gives the same model
    /// on every backend and machine.
    pub fn initial_values(&self, seed: u64) -> Vec<Vec<f32>> {
        self.specs
            .iter()
            .enumerate()
            .map(|(i, spec)| match spec.init {
                Init::Ones => vec![1.0; spec.numel()],
                Init::Zeros => vec![0.0; spec.numel()],
                Init::Uniform(bound) => {
                    let mut u = vec![0.0; spec.numel()];
                    rng::fill_uniform(&mut u, seed ^ ((i as u64 + 1) << 40), 0);
                    u.iter().map(|&u| (2.0 * u - 1.0) * bound).collect()
                }
                Init::Normal(std) => {
                    let mut z = vec![0.0; spec.numel()];
                    rng::fill_normal(&mut z, seed ^ ((i as u64 + 1) << 40), 0);
                    z.iter().map(|&z| z * std).collect()
                }
            })
            .collect()
    }
}

/// The least distance, in elements, between the starts of two parameters in a flat buffer:
/// 64 f32 = 256 bytes, the largest storage-buffer offset alignment WebGPU allows an adapter to
/// require, so that every parameter can be bound as a view of the flat buffer.
pub const PARAM_ALIGN: usize = 64;

/// Where each parameter of a list lives in one flat buffer: the parameters in declaration
/// order, each starting at a multiple of [`PARAM_ALIGN`], zeros between them — except the
/// members of a group (or of a set placed together), which follow each other without a gap
/// at the place of the first member, so that they are one block. The weights, their gradients, AdamW's
/// moments and the EMA weights of a model are each one such buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamLayout {
    pub offsets: Vec<usize>,
    pub shapes: Vec<Vec<usize>>,
    /// The groups of the list (see [`ParamList::groups`]).
    pub groups: Vec<Vec<usize>>,
    /// Elements of the flat buffer.
    pub total: usize,
}

impl ParamLayout {
    /// Elements of parameter `i`.
    pub fn numel(&self, i: usize) -> usize {
        self.shapes[i].iter().product()
    }

    /// One flat buffer from one vector per parameter.
    pub fn flatten(&self, values: &[Vec<f32>]) -> Result<Vec<f32>> {
        if values.len() != self.shapes.len() {
            return Err(Error::invalid(
                "flatten",
                format!(
                    "{} tensors for {} parameters",
                    values.len(),
                    self.shapes.len()
                ),
            ));
        }
        let mut flat = vec![0.0; self.total];
        for (i, v) in values.iter().enumerate() {
            if v.len() != self.numel(i) {
                return Err(Error::shape(
                    "flatten",
                    format!("{:?} (parameter {i})", self.shapes[i]),
                    &[v.len()],
                ));
            }
            flat[self.offsets[i]..][..v.len()].copy_from_slice(v);
        }
        Ok(flat)
    }

    /// One vector per parameter from a flat buffer.
    pub fn split(&self, flat: &[f32]) -> Vec<Vec<f32>> {
        (0..self.shapes.len())
            .map(|i| flat[self.offsets[i]..][..self.numel(i)].to_vec())
            .collect()
    }

    /// The group parameter `i` belongs to, if any.
    pub fn group_of(&self, i: usize) -> Option<usize> {
        self.groups.iter().position(|g| g.contains(&i))
    }

    /// The block of the flat buffer a group (or a lone parameter) covers: `(offset, len)`.
    pub fn span(&self, members: &[usize]) -> (usize, usize) {
        let len = members.iter().map(|&m| self.numel(m)).sum();
        (self.offsets[members[0]], len)
    }

    /// Every parameter as a view of the flat tensor `flat`.
    pub fn views(&self, flat: &Tensor) -> Result<Vec<Tensor>> {
        self.offsets
            .iter()
            .zip(&self.shapes)
            .map(|(&o, s)| flat.view(o, s))
            .collect()
    }
}
