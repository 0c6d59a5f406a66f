//! Parameter declarations: every layer registers its tensors here by their diffusers name, with
//! the initialisation PyTorch gives them by default.

use crate::rng;

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
            })
            .collect()
    }
}
