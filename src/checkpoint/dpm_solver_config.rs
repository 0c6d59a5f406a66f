//! The keys `DPMSolverMultistepScheduler` adds to a scheduler config, and the non-finite
//! numbers Python's `json` writes (`lambda_min_clipped: -Infinity`), which strict JSON lacks.
//!
//! A config of another scheduler class has none of these keys: the solver then takes
//! diffusers' defaults, as `DPMSolverMultistepScheduler.from_config(config)` does.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::diffusion::{DpmSolver, DpmSolverType, FinalSigmas};

/// A float that may be written as Python's `Infinity`, `-Infinity` or `NaN`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PyFloat(pub f64);

/// The name Python's `json` gives a non-finite float.
fn non_finite_name(v: f64) -> Option<&'static str> {
    if v.is_nan() {
        Some("NaN")
    } else if v == f64::INFINITY {
        Some("Infinity")
    } else if v == f64::NEG_INFINITY {
        Some("-Infinity")
    } else {
        None
    }
}

impl Serialize for PyFloat {
    /// Non-finite values as the strings `python_json_out` turns back into bare words.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match non_finite_name(self.0) {
            Some(name) => s.serialize_str(name),
            None => s.serialize_f64(self.0),
        }
    }
}

impl<'de> Deserialize<'de> for PyFloat {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(f64),
            Word(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(v) => Ok(PyFloat(v)),
            Raw::Word(w) => match w.as_str() {
                "Infinity" => Ok(PyFloat(f64::INFINITY)),
                "-Infinity" => Ok(PyFloat(f64::NEG_INFINITY)),
                "NaN" => Ok(PyFloat(f64::NAN)),
                other => Err(serde::de::Error::custom(format!(
                    "expected a number, found {other:?}"
                ))),
            },
        }
    }
}

/// Python's `Infinity`, `-Infinity` and `NaN` outside strings, quoted, so that strict JSON
/// reads them (as strings that `PyFloat` understands).
pub fn python_json_in(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        if let Some(word) = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|w| rest.starts_with(w))
        {
            out.push('"');
            out.push_str(word);
            out.push('"');
            rest = &rest[word.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// The inverse of `python_json_in` on text `serde_json` wrote: the quoted words, bare, as
/// Python's `json` writes and reads them.
pub fn python_json_out(text: &str) -> String {
    ["-Infinity", "Infinity", "NaN"]
        .into_iter()
        .fold(text.to_string(), |t, w| {
            t.replace(&format!(": \"{w}\""), &format!(": {w}"))
        })
}

/// `DPMSolverMultistepScheduler`'s own keys; absent keys take its defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DpmSolverKeys {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub solver_order: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub algorithm_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub solver_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lower_order_final: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub euler_at_final: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_karras_sigmas: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_exponential_sigmas: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_beta_sigmas: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_lu_lambdas: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_flow_sigmas: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_dynamic_shifting: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub final_sigmas_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lambda_min_clipped: Option<PyFloat>,
}

impl DpmSolverKeys {
    /// Every key at diffusers' default, as `DPMSolverMultistepScheduler().save_config` writes.
    pub fn defaults() -> Self {
        DpmSolverKeys::from_solver(&DpmSolver::default())
    }

    /// The keys that describe `solver`.
    pub fn from_solver(solver: &DpmSolver) -> Self {
        DpmSolverKeys {
            solver_order: Some(solver.solver_order),
            algorithm_type: Some("dpmsolver++".into()),
            solver_type: Some(
                match solver.solver_type {
                    DpmSolverType::Midpoint => "midpoint",
                    DpmSolverType::Heun => "heun",
                }
                .into(),
            ),
            lower_order_final: Some(solver.lower_order_final),
            euler_at_final: Some(solver.euler_at_final),
            use_karras_sigmas: Some(false),
            use_exponential_sigmas: Some(false),
            use_beta_sigmas: Some(false),
            use_lu_lambdas: Some(false),
            use_flow_sigmas: Some(false),
            use_dynamic_shifting: Some(false),
            final_sigmas_type: Some(
                match solver.final_sigmas {
                    FinalSigmas::Zero => "zero",
                    FinalSigmas::SigmaMin => "sigma_min",
                }
                .into(),
            ),
            lambda_min_clipped: Some(PyFloat(solver.lambda_min_clipped)),
        }
    }

    /// The solver these keys describe; the error names a key diffwgpu does not implement and
    /// the value to set instead.
    pub fn solver(&self) -> Result<DpmSolver, String> {
        let d = DpmSolver::default();
        for (key, on) in [
            ("use_karras_sigmas", self.use_karras_sigmas),
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
            ("use_lu_lambdas", self.use_lu_lambdas),
            ("use_flow_sigmas", self.use_flow_sigmas),
            ("use_dynamic_shifting", self.use_dynamic_shifting),
        ] {
            if on == Some(true) {
                return Err(format!(
                    "unsupported {key} = true; diffwgpu's DPM-Solver++ steps over the training \
                     timesteps' own sigmas, so set it to false"
                ));
            }
        }
        if let Some(a) = self.algorithm_type.as_deref() {
            if a != "dpmsolver++" {
                return Err(format!(
                    "unsupported algorithm_type = {a:?}; diffwgpu implements \"dpmsolver++\", \
                     so set that"
                ));
            }
        }
        let solver_type = match self.solver_type.as_deref() {
            None | Some("midpoint") => DpmSolverType::Midpoint,
            Some("heun") => DpmSolverType::Heun,
            Some(other) => {
                return Err(format!(
                    "unknown solver_type = {other:?}; use \"midpoint\" or \"heun\""
                ))
            }
        };
        let final_sigmas = match self.final_sigmas_type.as_deref() {
            None | Some("zero") => FinalSigmas::Zero,
            Some("sigma_min") => FinalSigmas::SigmaMin,
            Some(other) => {
                return Err(format!(
                    "unknown final_sigmas_type = {other:?}; use \"zero\" or \"sigma_min\""
                ))
            }
        };
        let solver = DpmSolver {
            solver_order: self.solver_order.unwrap_or(d.solver_order),
            solver_type,
            lower_order_final: self.lower_order_final.unwrap_or(d.lower_order_final),
            euler_at_final: self.euler_at_final.unwrap_or(d.euler_at_final),
            final_sigmas,
            lambda_min_clipped: self
                .lambda_min_clipped
                .map_or(d.lambda_min_clipped, |v| v.0),
        };
        solver.validate().map_err(|e| match e {
            crate::error::Error::Invalid { msg, .. } => msg,
            other => other.to_string(),
        })?;
        Ok(solver)
    }
}
