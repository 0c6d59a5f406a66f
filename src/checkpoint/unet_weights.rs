//! Matching a weights file to a model: every parameter by its diffusers name and shape, with
//! the attention names of older diffusers checkpoints (`query`, `key`, `value`, `proj_attn`)
//! read as today's (`to_q`, `to_k`, `to_v`, `to_out.0`).

use std::collections::BTreeMap;
use std::path::Path;

use super::{error, NamedTensor};
use crate::error::Result;
use crate::nn::UNet2D;

/// Today's name of a parameter that an older checkpoint may carry.
fn current_name(name: &str) -> String {
    [
        (".query.", ".to_q."),
        (".key.", ".to_k."),
        (".value.", ".to_v."),
        (".proj_attn.", ".to_out.0."),
    ]
    .iter()
    .fold(name.to_string(), |n, (old, new)| n.replace(old, new))
}

/// `values` (one per parameter of `model`, in its declaration order) under the parameters'
/// diffusers names and shapes, as a weights file holds them: the inverse of [`unet_weights`].
pub fn named_weights(model: &UNet2D, values: Vec<Vec<f32>>) -> Vec<NamedTensor> {
    model
        .params
        .specs
        .iter()
        .zip(values)
        .map(|(spec, data)| NamedTensor {
            name: spec.name.clone(),
            shape: spec.shape.clone(),
            data,
        })
        .collect()
}

/// The values of every parameter of `model`, in its declaration order, from `weights` (read
/// from `path`); a missing, extra or misshapen tensor is an error that names it.
pub fn unet_weights(model: &UNet2D, weights: &[NamedTensor], path: &Path) -> Result<Vec<Vec<f32>>> {
    let mut by_name: BTreeMap<String, &NamedTensor> =
        weights.iter().map(|t| (current_name(&t.name), t)).collect();
    let values = model
        .params
        .specs
        .iter()
        .map(|spec| {
            let t = by_name.remove(&spec.name).ok_or_else(|| {
                error(
                    path,
                    format!(
                        "has no tensor {} that the config's model needs; the weights belong to \
                         another config",
                        spec.name
                    ),
                )
            })?;
            if t.shape != spec.shape {
                return Err(error(
                    path,
                    format!(
                        "tensor {} has shape {:?}, the config's model needs {:?}",
                        spec.name, t.shape, spec.shape
                    ),
                ));
            }
            Ok(t.data.clone())
        })
        .collect::<Result<Vec<_>>>()?;
    if let Some(extra) = by_name.keys().next() {
        return Err(error(
            path,
            format!(
                "has {} tensor(s) the config's model does not have, e.g. {extra}; the weights \
                 belong to another config",
                by_name.len()
            ),
        ));
    }
    Ok(values)
}
