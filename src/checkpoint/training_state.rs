//! The state a run resumes from: the raw weights, AdamW's two moments, the EMA weights and the
//! step, in one safetensors file. The tensors of each group carry a name prefix (`param.`,
//! `adam_m.`, `adam_v.`, `ema.`); the step and the free-form entries (seed, batch size,
//! learning rate, config JSON, ...) go in the metadata.

use std::collections::BTreeMap;
use std::path::Path;

use super::safetensors_io::write_renamed;
use super::{error, read_safetensors, NamedTensor};
use crate::error::Result;

/// The file name of the training state in a run's output folder.
pub const TRAINING_STATE_FILE: &str = "training_state.safetensors";

/// The metadata key of the step count.
const STEP_KEY: &str = "step";

const PARAM: &str = "param.";
const ADAM_M: &str = "adam_m.";
const ADAM_V: &str = "adam_v.";
const EMA: &str = "ema.";

/// Everything a training run needs to continue where it stopped.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TrainingState {
    /// The number of optimizer steps taken.
    pub step: u64,
    /// The weights being trained.
    pub params: Vec<NamedTensor>,
    /// AdamW's first moments, one per param (or none, before the first step).
    pub adam_m: Vec<NamedTensor>,
    /// AdamW's second moments, one per param (or none, before the first step).
    pub adam_v: Vec<NamedTensor>,
    /// The exponential moving average of the weights, one per param (or none without EMA).
    pub ema: Vec<NamedTensor>,
    /// Free-form entries: seed, batch size, learning rate, preset, config JSON, ...
    pub meta: BTreeMap<String, String>,
}

impl TrainingState {
    /// Writes the state to `path` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        if self.meta.contains_key(STEP_KEY) {
            return Err(error(
                path,
                format!(
                    "meta has an entry {STEP_KEY:?}, which the file keeps for the step count; \
                     give that entry another name"
                ),
            ));
        }
        let mut metadata = self.meta.clone();
        metadata.insert(STEP_KEY.into(), self.step.to_string());
        let tensors = self
            .groups()
            .into_iter()
            .flat_map(|(prefix, group)| {
                group
                    .iter()
                    .map(move |t| (format!("{prefix}{}", t.name), t))
            })
            .collect();
        write_renamed(path, tensors, &metadata)
    }

    /// Reads a state that [`TrainingState::save`] wrote, checking that every moment and EMA
    /// tensor matches a param in name and shape.
    pub fn load(path: &Path) -> Result<Self> {
        let (tensors, mut meta) = read_safetensors(path)?;
        let not_a_state = |what: &str| {
            error(
                path,
                format!(
                    "not a diffwgpu training state: {what}; give the {TRAINING_STATE_FILE} that \
                     a training run wrote"
                ),
            )
        };
        let step = meta
            .remove(STEP_KEY)
            .ok_or_else(|| not_a_state("its metadata has no step"))?;
        let step = step
            .parse()
            .map_err(|_| not_a_state(&format!("its step {step:?} is not a whole number")))?;
        let mut state = TrainingState {
            step,
            meta,
            ..TrainingState::default()
        };
        for mut tensor in tensors {
            let Some((prefix, group)) = state
                .groups_mut()
                .into_iter()
                .find(|(prefix, _)| tensor.name.starts_with(prefix))
            else {
                return Err(not_a_state(&format!(
                    "tensor {:?} has none of the prefixes {PARAM}, {ADAM_M}, {ADAM_V}, {EMA}",
                    tensor.name
                )));
            };
            tensor.name.drain(..prefix.len());
            group.push(tensor);
        }
        if state.params.is_empty() {
            return Err(not_a_state(&format!("it holds no {PARAM}* tensors")));
        }
        for (prefix, group) in state.groups().into_iter().skip(1) {
            check_matches(path, prefix, group, &state.params)?;
        }
        Ok(state)
    }

    /// The four tensor groups with their name prefixes, params first.
    fn groups(&self) -> [(&'static str, &Vec<NamedTensor>); 4] {
        [
            (PARAM, &self.params),
            (ADAM_M, &self.adam_m),
            (ADAM_V, &self.adam_v),
            (EMA, &self.ema),
        ]
    }

    /// The four tensor groups with their name prefixes, to fill.
    fn groups_mut(&mut self) -> [(&'static str, &mut Vec<NamedTensor>); 4] {
        [
            (PARAM, &mut self.params),
            (ADAM_M, &mut self.adam_m),
            (ADAM_V, &mut self.adam_v),
            (EMA, &mut self.ema),
        ]
    }
}

/// Checks that `group` is empty or has exactly one tensor per param, of the param's shape.
fn check_matches(
    path: &Path,
    prefix: &str,
    group: &[NamedTensor],
    params: &[NamedTensor],
) -> Result<()> {
    if group.is_empty() {
        return Ok(());
    }
    let resave = "the file is damaged or was written by another program; resume from another \
                  checkpoint, or start the run again";
    for param in params {
        match group.iter().find(|t| t.name == param.name) {
            None => {
                return Err(error(
                    path,
                    format!("{PARAM}{0} has no {prefix}{0}; {resave}", param.name),
                ))
            }
            Some(t) if t.shape != param.shape => {
                return Err(error(
                    path,
                    format!(
                        "{prefix}{} has shape {:?} but its param has shape {:?}; {resave}",
                        t.name, t.shape, param.shape
                    ),
                ))
            }
            Some(_) => {}
        }
    }
    match group
        .iter()
        .find(|t| !params.iter().any(|p| p.name == t.name))
    {
        Some(extra) => Err(error(
            path,
            format!("{prefix}{0} has no {PARAM}{0}; {resave}", extra.name),
        )),
        None => Ok(()),
    }
}
