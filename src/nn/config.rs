//! The model configuration: the keys of diffusers' `UNet2DModel` `config.json`, with the same
//! defaults, so that a config written by either side reads in the other. Keys diffwgpu does not
//! implement are accepted only at the value that means "off" (or the one value we build);
//! anything else is refused with a message that names the key.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// `sample_size` is an integer in our configs; diffusers also allows `[h, w]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SampleSize {
    Square(usize),
    HeightWidth([usize; 2]),
}

/// `UNet2DModel`'s configuration. Missing keys take diffusers' defaults; unknown keys are
/// ignored (diffusers writes bookkeeping keys we have no use for).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UNet2DConfig {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    pub sample_size: SampleSize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub time_embedding_type: String,
    pub freq_shift: f32,
    pub flip_sin_to_cos: bool,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub mid_block_scale_factor: f32,
    pub downsample_padding: usize,
    pub downsample_type: String,
    pub upsample_type: String,
    pub dropout: f32,
    pub act_fn: String,
    pub attention_head_dim: Option<usize>,
    pub norm_num_groups: Option<usize>,
    pub attn_norm_num_groups: Option<usize>,
    pub norm_eps: f32,
    pub resnet_time_scale_shift: String,
    pub add_attention: bool,
    pub class_embed_type: Option<String>,
    pub num_class_embeds: Option<usize>,
    /// The time embedding's width; `null` means `4 * block_out_channels[0]`.
    pub time_embedding_dim: Option<usize>,
    /// The middle block; `null` would mean none.
    pub mid_block_type: Option<String>,
}

impl Default for UNet2DConfig {
    /// diffusers' defaults for `UNet2DModel`.
    fn default() -> Self {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect();
        UNet2DConfig {
            class_name: "UNet2DModel".into(),
            sample_size: SampleSize::Square(32),
            in_channels: 3,
            out_channels: 3,
            center_input_sample: false,
            time_embedding_type: "positional".into(),
            freq_shift: 0.0,
            flip_sin_to_cos: true,
            down_block_types: s(&[
                "DownBlock2D",
                "AttnDownBlock2D",
                "AttnDownBlock2D",
                "AttnDownBlock2D",
            ]),
            up_block_types: s(&[
                "AttnUpBlock2D",
                "AttnUpBlock2D",
                "AttnUpBlock2D",
                "UpBlock2D",
            ]),
            block_out_channels: vec![224, 448, 672, 896],
            layers_per_block: 2,
            mid_block_scale_factor: 1.0,
            downsample_padding: 1,
            downsample_type: "conv".into(),
            upsample_type: "conv".into(),
            dropout: 0.0,
            act_fn: "silu".into(),
            attention_head_dim: Some(8),
            norm_num_groups: Some(32),
            attn_norm_num_groups: None,
            norm_eps: 1e-5,
            resnet_time_scale_shift: "default".into(),
            add_attention: true,
            class_embed_type: None,
            num_class_embeds: None,
            time_embedding_dim: None,
            mid_block_type: Some("UNetMidBlock2D".into()),
        }
    }
}

/// The named model sizes: the same configs as `tools/` uses on the PyTorch side.
pub const PRESETS: &[&str] = &["tiny", "mnist", "cifar10"];

impl UNet2DConfig {
    /// A named preset: `tiny` (tests), `mnist` (the default), `cifar10` (the DDPM paper's size).
    pub fn preset(name: &str) -> Result<Self> {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect();
        let base = UNet2DConfig::default();
        let config = match name {
            "tiny" => UNet2DConfig {
                sample_size: SampleSize::Square(16),
                in_channels: 1,
                out_channels: 1,
                block_out_channels: vec![16, 32],
                layers_per_block: 1,
                down_block_types: s(&["DownBlock2D", "AttnDownBlock2D"]),
                up_block_types: s(&["AttnUpBlock2D", "UpBlock2D"]),
                norm_num_groups: Some(8),
                ..base
            },
            "mnist" => UNet2DConfig {
                sample_size: SampleSize::Square(32),
                in_channels: 1,
                out_channels: 1,
                block_out_channels: vec![32, 64, 128],
                layers_per_block: 2,
                down_block_types: s(&["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"]),
                up_block_types: s(&["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]),
                norm_num_groups: Some(8),
                ..base
            },
            "cifar10" => UNet2DConfig {
                sample_size: SampleSize::Square(32),
                in_channels: 3,
                out_channels: 3,
                block_out_channels: vec![128, 256, 256, 256],
                layers_per_block: 2,
                down_block_types: s(&[
                    "DownBlock2D",
                    "AttnDownBlock2D",
                    "DownBlock2D",
                    "DownBlock2D",
                ]),
                up_block_types: s(&["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]),
                norm_num_groups: Some(32),
                norm_eps: 1e-6,
                flip_sin_to_cos: false,
                freq_shift: 1.0,
                downsample_padding: 0,
                ..base
            },
            other => {
                return Err(Error::Config(format!(
                    "unknown preset {other:?}; choose one of {}",
                    PRESETS.join(", ")
                )))
            }
        };
        Ok(config)
    }

    /// Reads a `config.json` and checks that diffwgpu can build it.
    pub fn from_json(text: &str) -> Result<Self> {
        let config: UNet2DConfig = serde_json::from_str(text)
            .map_err(|e| Error::Config(format!("not a valid UNet2DModel config.json: {e}")))?;
        config.validate()?;
        Ok(config)
    }

    /// The config as diffusers writes it (pretty JSON).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a config always serializes")
    }

    /// The side of the (square) images the model takes.
    pub fn size(&self) -> usize {
        match self.sample_size {
            SampleSize::Square(s) => s,
            SampleSize::HeightWidth([h, _]) => h,
        }
    }

    /// The group count of every GroupNorm.
    pub fn groups(&self) -> usize {
        self.norm_num_groups.unwrap_or(32)
    }

    /// The group count of the attention layers' GroupNorm.
    pub fn attn_groups(&self) -> usize {
        self.attn_norm_num_groups.unwrap_or_else(|| self.groups())
    }

    /// The width of the time embedding (`time_embedding_dim`, by default
    /// `block_out_channels[0] * 4`).
    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim
            .unwrap_or(self.block_out_channels[0] * 4)
    }

    /// Rows of the class embedding table: 0 for an unconditional model.
    pub fn class_count(&self) -> usize {
        self.num_class_embeds.unwrap_or(0)
    }

    /// The number of heads of an attention layer over `channels` channels.
    pub fn heads(&self, channels: usize) -> usize {
        channels / self.attention_head_dim.unwrap_or(channels)
    }

    /// Checks every key diffwgpu depends on; the error names the key and the fix.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Config(msg));
        let unsupported = |key: &str, value: String, want: &str| {
            Err(Error::Config(format!(
                "unsupported {key} = {value}; diffwgpu builds only {key} = {want}"
            )))
        };
        if self.class_name != "UNet2DModel" {
            return unsupported(
                "_class_name",
                format!("{:?}", self.class_name),
                "\"UNet2DModel\"",
            );
        }
        if self.time_embedding_type != "positional" {
            return unsupported(
                "time_embedding_type",
                format!("{:?}", self.time_embedding_type),
                "\"positional\"",
            );
        }
        if self.act_fn != "silu" && self.act_fn != "swish" {
            return unsupported("act_fn", format!("{:?}", self.act_fn), "\"silu\"");
        }
        if self.resnet_time_scale_shift != "default" {
            return unsupported(
                "resnet_time_scale_shift",
                format!("{:?}", self.resnet_time_scale_shift),
                "\"default\"",
            );
        }
        if self.downsample_type != "conv" {
            return unsupported(
                "downsample_type",
                format!("{:?}", self.downsample_type),
                "\"conv\"",
            );
        }
        if self.upsample_type != "conv" {
            return unsupported(
                "upsample_type",
                format!("{:?}", self.upsample_type),
                "\"conv\"",
            );
        }
        if let Some(c) = &self.class_embed_type {
            return unsupported(
                "class_embed_type",
                format!("{c:?}"),
                "null (a table of num_class_embeds rows added to the time embedding)",
            );
        }
        if self.num_class_embeds == Some(0) {
            return bad(
                "num_class_embeds = 0; use null (unconditional) or the number of \
                        classes (plus one for a null class)"
                    .into(),
            );
        }
        if self.mid_block_type.as_deref() != Some("UNetMidBlock2D") {
            return unsupported(
                "mid_block_type",
                format!("{:?}", self.mid_block_type),
                "\"UNetMidBlock2D\"",
            );
        }
        if self.time_embedding_dim == Some(0) {
            return bad(
                "time_embedding_dim = 0; use null (4 x block_out_channels[0]) or a \
                        positive width"
                    .into(),
            );
        }
        if self.center_input_sample {
            return unsupported("center_input_sample", "true".into(), "false");
        }
        if self.mid_block_scale_factor != 1.0 {
            return unsupported(
                "mid_block_scale_factor",
                self.mid_block_scale_factor.to_string(),
                "1.0",
            );
        }
        if !self.add_attention {
            return unsupported("add_attention", "false".into(), "true");
        }
        if self.downsample_padding > 1 {
            return unsupported(
                "downsample_padding",
                self.downsample_padding.to_string(),
                "0 or 1",
            );
        }
        if let SampleSize::HeightWidth([h, w]) = self.sample_size {
            if h != w {
                return bad(format!(
                    "sample_size = [{h}, {w}] is not square; diffwgpu models square images"
                ));
            }
        }
        let levels = self.block_out_channels.len();
        if levels == 0 {
            return bad("block_out_channels is empty; give one channel count per level".into());
        }
        if self.down_block_types.len() != levels || self.up_block_types.len() != levels {
            return bad(format!(
                "block_out_channels has {levels} levels but down_block_types has {} and \
                 up_block_types {}; give one block type per level",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        for t in &self.down_block_types {
            if t != "DownBlock2D" && t != "AttnDownBlock2D" {
                return unsupported(
                    "down_block_types",
                    format!("[.., {t:?}, ..]"),
                    "\"DownBlock2D\" or \"AttnDownBlock2D\"",
                );
            }
        }
        for t in &self.up_block_types {
            if t != "UpBlock2D" && t != "AttnUpBlock2D" {
                return unsupported(
                    "up_block_types",
                    format!("[.., {t:?}, ..]"),
                    "\"UpBlock2D\" or \"AttnUpBlock2D\"",
                );
            }
        }
        if self.layers_per_block == 0 {
            return bad("layers_per_block = 0; every level needs at least one resnet".into());
        }
        if self.in_channels == 0 || self.out_channels == 0 {
            return bad("in_channels and out_channels must be at least 1".into());
        }
        let size = self.size();
        let halvings = levels - 1;
        if size == 0 || !size.is_multiple_of(1 << halvings) {
            return bad(format!(
                "sample_size = {size} cannot be halved {halvings} times by the {levels}-level \
                 down path; use a multiple of {}",
                1 << halvings
            ));
        }
        let groups = self.groups();
        let attn_groups = self.attn_groups();
        for &c in &self.block_out_channels {
            if c == 0 || !c.is_multiple_of(groups) {
                return bad(format!(
                    "block_out_channels entry {c} is not divisible by norm_num_groups = {groups}; \
                     make every channel count a multiple of the group count"
                ));
            }
            if !c.is_multiple_of(attn_groups) {
                return bad(format!(
                    "block_out_channels entry {c} is not divisible by attn_norm_num_groups = \
                     {attn_groups}"
                ));
            }
            if let Some(d) = self.attention_head_dim {
                if d == 0 || !c.is_multiple_of(d) {
                    return bad(format!(
                        "block_out_channels entry {c} is not divisible by attention_head_dim = \
                         {d}; choose a head width that divides every channel count"
                    ));
                }
            }
        }
        if self.norm_eps.is_nan() || self.norm_eps <= 0.0 {
            return bad(format!("norm_eps = {} must be positive", self.norm_eps));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout = {} must be in [0, 1)", self.dropout));
        }
        Ok(())
    }
}
