//! diffusers' `UNet2DModel`, built from its config with the same parameter names and shapes.
//!
//!   temb = linear_2(SiLU(linear_1(sinusoidal(t))))  [+ class_embedding[label] when conditional]
//!   h = conv_in(x);                    skips = [h]
//!   down levels: (resnet [+ attention]) x layers_per_block, each pushing a skip;
//!                then a stride-2 conv (not on the last level), pushing a skip
//!   mid: resnet, attention, resnet
//!   up levels:   (concat [h, skips.pop()] -> resnet [+ attention]) x (layers_per_block + 1);
//!                then nearest x2 and a 3x3 conv (not on the last level)
//!   out = conv_out(SiLU(conv_norm_out(h)))

use super::attention::AttentionBlock;
use super::config::UNet2DConfig;
use super::layers::{Conv2d, Embedding, GroupNorm, Linear};
use super::params::ParamList;
use super::resnet::{ResnetBlock2D, Shared};
use crate::autodiff::{Tape, Var};
use crate::error::{Error, Result};
use crate::ops::conv2d::Conv2dParams;
use crate::ops::embedding::TimestepEmbeddingParams;
use crate::tensor::Tensor;

/// One level of the down or up path.
struct Level {
    resnets: Vec<ResnetBlock2D>,
    /// Empty for `DownBlock2D` / `UpBlock2D`; one per resnet for the attention variants.
    attentions: Vec<AttentionBlock>,
    /// `downsamplers.0.conv` or `upsamplers.0.conv`.
    resample: Option<Conv2d>,
}

impl Level {
    /// Resnet `j` then, in attention blocks, attention `j`.
    fn layer(&self, tape: &mut Tape, p: &[Var], j: usize, h: Var, temb: Var) -> Result<Var> {
        let h = self.resnets[j].forward(tape, p, h, temb)?;
        match self.attentions.get(j) {
            Some(attn) => attn.forward(tape, p, h),
            None => Ok(h),
        }
    }
}

/// The noise-prediction network `eps_theta(x_t, t)`.
pub struct UNet2D {
    pub config: UNet2DConfig,
    pub params: ParamList,
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    /// The class-conditional model's table (`num_class_embeds` rows).
    class_embedding: Option<Embedding>,
    down: Vec<Level>,
    mid: (ResnetBlock2D, AttentionBlock, ResnetBlock2D),
    up: Vec<Level>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet2D {
    /// Builds the layers and declares the parameters of `config` (validated first).
    pub fn new(config: &UNet2DConfig) -> Result<Self> {
        config.validate()?;
        let cfg = config;
        let list = &mut ParamList::default();
        let channels = &cfg.block_out_channels;
        let levels = channels.len();
        let (eps, temb) = (cfg.norm_eps, cfg.time_embed_dim());
        let shared = Shared {
            temb,
            groups: cfg.groups(),
            eps,
            dropout: cfg.dropout,
        };
        let attn_groups = cfg.attn_groups();
        let same = Conv2dParams::new(1, 1);

        let conv_in = Conv2d::new(list, "conv_in", cfg.in_channels, channels[0], 3, same);
        let time_linear_1 = Linear::new(list, "time_embedding.linear_1", channels[0], temb);
        let time_linear_2 = Linear::new(list, "time_embedding.linear_2", temb, temb);
        let class_embedding = cfg
            .num_class_embeds
            .map(|k| Embedding::new(list, "class_embedding", k, temb));

        let mut down = Vec::with_capacity(levels);
        let mut cout = channels[0];
        for (i, kind) in cfg.down_block_types.iter().enumerate() {
            let cin = cout;
            cout = channels[i];
            let name = format!("down_blocks.{i}");
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let c = if j == 0 { cin } else { cout };
                    let n = format!("{name}.resnets.{j}");
                    ResnetBlock2D::new(list, &n, (c, cout), &shared)
                })
                .collect();
            let attentions = attention_layers(list, cfg, kind, &name, cfg.layers_per_block, cout);
            let resample = (i + 1 < levels).then(|| {
                let pad = if cfg.downsample_padding == 0 {
                    Conv2dParams::with_padding(2, [0, 1, 0, 1])
                } else {
                    Conv2dParams::new(2, cfg.downsample_padding)
                };
                Conv2d::new(
                    list,
                    &format!("{name}.downsamplers.0.conv"),
                    cout,
                    cout,
                    3,
                    pad,
                )
            });
            down.push(Level {
                resnets,
                attentions,
                resample,
            });
        }

        let c = channels[levels - 1];
        let mid = (
            ResnetBlock2D::new(list, "mid_block.resnets.0", (c, c), &shared),
            AttentionBlock::new(
                list,
                "mid_block.attentions.0",
                c,
                cfg.heads(c),
                attn_groups,
                eps,
            ),
            ResnetBlock2D::new(list, "mid_block.resnets.1", (c, c), &shared),
        );

        let reversed: Vec<usize> = channels.iter().rev().copied().collect();
        let mut up = Vec::with_capacity(levels);
        let mut cout = reversed[0];
        for (i, kind) in cfg.up_block_types.iter().enumerate() {
            let prev = cout;
            cout = reversed[i];
            let cskip_last = reversed[(i + 1).min(levels - 1)];
            let name = format!("up_blocks.{i}");
            let n_layers = cfg.layers_per_block + 1;
            let resnets = (0..n_layers)
                .map(|j| {
                    let skip = if j + 1 == n_layers { cskip_last } else { cout };
                    let current = if j == 0 { prev } else { cout };
                    let n = format!("{name}.resnets.{j}");
                    ResnetBlock2D::new(list, &n, (current + skip, cout), &shared)
                })
                .collect();
            let attentions = attention_layers(list, cfg, kind, &name, n_layers, cout);
            let resample = (i + 1 < levels).then(|| {
                let n = format!("{name}.upsamplers.0.conv");
                Conv2d::new(list, &n, cout, cout, 3, same)
            });
            up.push(Level {
                resnets,
                attentions,
                resample,
            });
        }

        let out_groups = cfg
            .norm_num_groups
            .unwrap_or_else(|| (channels[0] / 4).clamp(1, 32));
        let conv_norm_out = GroupNorm::new(list, "conv_norm_out", channels[0], out_groups, eps);
        let conv_out = Conv2d::new(list, "conv_out", channels[0], cfg.out_channels, 3, same);

        Ok(UNet2D {
            config: config.clone(),
            params: std::mem::take(list),
            conv_in,
            time_linear_1,
            time_linear_2,
            class_embedding,
            down,
            mid,
            up,
            conv_norm_out,
            conv_out,
        })
    }

    /// The sinusoidal embedding `time_proj` of diffusers' `Timesteps`.
    fn time_proj(&self) -> TimestepEmbeddingParams {
        TimestepEmbeddingParams {
            dim: self.config.block_out_channels[0],
            flip_sin_to_cos: self.config.flip_sin_to_cos,
            downscale_freq_shift: self.config.freq_shift,
            scale: 1.0,
            max_period: 10_000.0,
        }
    }

    /// The model's output for `x [B, in_channels, S, S]` at timesteps `t [B]` (as f32) and,
    /// for a class-conditional model, one class label per image, given the parameters as tape
    /// variables in declaration order.
    pub fn forward(
        &self,
        tape: &mut Tape,
        p: &[Var],
        x: Var,
        t: &Tensor,
        labels: Option<&[u32]>,
    ) -> Result<Var> {
        if p.len() != self.params.specs.len() {
            return Err(Error::invalid(
                "UNet2D::forward",
                format!(
                    "{} parameters given, the model has {}",
                    p.len(),
                    self.params.specs.len()
                ),
            ));
        }
        let s = self.config.size();
        let want = [t.numel(), self.config.in_channels, s, s];
        if tape.shape(x) != want {
            return Err(Error::shape(
                "UNet2D::forward",
                format!("x of shape {want:?} (one timestep per sample)"),
                tape.shape(x),
            ));
        }
        let be = tape.backend();
        let t_emb = be.timestep_embedding(t, &self.time_proj())?;
        let t_emb = tape.leaf(t_emb, false);
        let temb = self.time_linear_1.forward(tape, p, t_emb)?;
        let temb = tape.silu(temb)?;
        let mut temb = self.time_linear_2.forward(tape, p, temb)?;
        match (&self.class_embedding, labels) {
            (Some(table), Some(labels)) if labels.len() == t.numel() => {
                let class_emb = table.forward(tape, p, labels)?;
                temb = tape.add(temb, class_emb)?;
            }
            (Some(_), Some(labels)) => {
                return Err(Error::invalid(
                    "UNet2D::forward",
                    format!("{} labels for {} images", labels.len(), t.numel()),
                ))
            }
            (Some(_), None) => {
                return Err(Error::invalid(
                    "UNet2D::forward",
                    "this model is class-conditional (num_class_embeds is set): give one \
                     class label per image",
                ))
            }
            (None, Some(_)) => {
                return Err(Error::invalid(
                    "UNet2D::forward",
                    "class labels given to an unconditional model (num_class_embeds is null)",
                ))
            }
            (None, None) => {}
        }
        // Every resnet applies SiLU to the embedding before its projection: do it once.
        let temb = tape.silu(temb)?;

        let mut h = self.conv_in.forward(tape, p, x)?;
        let mut skips = vec![h];
        for level in &self.down {
            for j in 0..level.resnets.len() {
                h = level.layer(tape, p, j, h, temb)?;
                skips.push(h);
            }
            if let Some(conv) = &level.resample {
                h = conv.forward(tape, p, h)?;
                skips.push(h);
            }
        }

        h = self.mid.0.forward(tape, p, h, temb)?;
        h = self.mid.1.forward(tape, p, h)?;
        h = self.mid.2.forward(tape, p, h, temb)?;

        for level in &self.up {
            for j in 0..level.resnets.len() {
                let skip = skips.pop().expect("one skip per up-path resnet");
                h = tape.concat_channels(h, skip)?;
                h = level.layer(tape, p, j, h, temb)?;
            }
            if let Some(conv) = &level.resample {
                h = tape.upsample_nearest2x(h)?;
                h = conv.forward(tape, p, h)?;
            }
        }

        h = self.conv_norm_out.forward_silu(tape, p, h)?;
        self.conv_out.forward(tape, p, h)
    }
}

/// The attention layers of an `Attn*Block2D` level (none for the plain blocks). Their group
/// norms use `norm_num_groups`; `attn_norm_num_groups` applies to the mid block only.
fn attention_layers(
    list: &mut ParamList,
    cfg: &UNet2DConfig,
    kind: &str,
    name: &str,
    n: usize,
    channels: usize,
) -> Vec<AttentionBlock> {
    if !kind.starts_with("Attn") {
        return Vec::new();
    }
    (0..n)
        .map(|j| {
            AttentionBlock::new(
                list,
                &format!("{name}.attentions.{j}"),
                channels,
                cfg.heads(channels),
                cfg.groups(),
                cfg.norm_eps,
            )
        })
        .collect()
}
