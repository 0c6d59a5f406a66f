"""Reference fixtures from diffusers' UNet2DModel, for diffwgpu's parity tests.

Writes, under tests/fixtures/ of the repository:

  unet_params_{tiny,mnist,cifar10}.txt
      One line per parameter of `UNet2DModel(**PRESETS[name])`, in `named_parameters()` order:
      `name shape`, the shape as comma-separated ints (`conv_in.weight 16,1,3,3`), then a last
      line `total N` with the parameter count. These pin the parameter names (the checkpoint
      keys diffusers reads and writes), their shapes and their order.

  tiny_reference.safetensors   (float32 tensors; metadata: diffusers_version, torch_version, ...)
      One forward and backward pass of the `tiny` preset:
        param.<name>  every parameter (the full state dict): torch.manual_seed(0) initialisation,
                      then every GroupNorm weight set to 1 + 0.1*randn and every bias (GroupNorm,
                      conv, linear) shifted by 0.1*randn, so that a swapped or ignored
                      scale/shift shows up in the comparison
        x             input, randn [2, 1, 16, 16]
        t             timesteps [37, 901] (float32, shape [2])
        t_emb         the sinusoidal timestep projection (time_proj output), [2, 16]
        out           model(x, t).sample, [2, 1, 16, 16]
        target        randn, same shape as out
        loss          mse_loss(out, target) (mean over all elements), shape [1]
        grad.<name>   d loss / d parameter, for every parameter
      The stored parameters are exactly the float32 values the model was evaluated with. The
      evaluation itself (out, t_emb, loss, grads) runs in float64 and is rounded to float32
      only when stored, so the reference carries no float32 rounding of its own. diffusers'
      get_timestep_embedding always computes in float32; for the float64 evaluation the
      same formula is evaluated in float64 instead (checked below against diffusers' own).
      The script also runs diffusers unmodified in float32 and prints how far that is from the
      float64 reference: a guide to the tolerance a float32 implementation can be held to.

  unets/<name>/config.json, unets/<name>/diffusion_pytorch_model.safetensors
      Small UNet2DModel folders as `model.save_pretrained` writes them, one per config of UNETS
      (chosen to cover the options diffwgpu's blocks must handle), with weights initialised and
      perturbed as above (seed: the config's position in UNETS, from 1). Each is checked to load
      back in diffusers (from_pretrained) with the output of its reference.
      unets/class_conditional/ is class-conditional: num_class_embeds 11 (classes 0..9 and the
      null class 10 of classifier-free guidance), class_embed_type null, so diffusers adds
      class_embedding (nn.Embedding(11, time_embed_dim), its default N(0, 1) initialisation) of
      the labels to the output of time_embedding; its weights hold `class_embedding.weight`.
  unets/<name>_old_names/
      The folder of OLD_NAMES_SOURCE with the attention keys older diffusers versions wrote
      (query, key, value, proj_attn instead of to_q, to_k, to_v, to_out.0). diffusers still
      loads it (checked below: same output), and so must diffwgpu.
  unets/<name>_reference.safetensors   (float32; metadata as above plus the config name)
      x, t, target, out, loss and grad.<param> for every parameter of unets/<name>, as in
      tiny_reference.safetensors (evaluated in float64); the old-names folder shares the
      reference of its source. class_conditional_reference.safetensors also holds
        class_labels  the labels the model was called with (as a LongTensor), [3, 10] (a real
                      class and the null class; float32, shape [2]); grad.class_embedding.weight
                      is nonzero in rows 3 and 10 only

  scheduler_steps.json, scheduler_steps.safetensors
      Single steps of DDPMScheduler and DDIMScheduler (SCHEDULER_CASES). The JSON lists each
      case: its scheduler config (as `save_config` writes it), num_inference_steps, eta (DDIM),
      the `timesteps` that set_timesteps gave, and the timesteps stepped from. For every such
      step `t` the safetensors hold `<case>.<t>.x_t`, `.model_output`, `.noise` and
      `.prev_sample` ([2, 3, 4, 4] each), plus `<case>.alphas_cumprod`. x_t is q_sample of a
      random x_0 in [-1.2, 1.2]; model_output is the exact prediction of the case's
      prediction_type plus 0.3 * randn, so clipping of x0_hat happens but not everywhere.
      prev_sample is diffusers' step evaluated in float64, as the models above: the inputs
      and the scheduler's float32 alphas_cumprod (and its 1 and final_alpha_cumprod) widened
      to float64, then the result rounded to float32. diffusers' own float32 step loses up to
      about 1e-4 relative near t = 0, where 1 - abar_t and 1 - abar_t / abar_prev cancel; the
      script prints that distance. DDIMScheduler.step takes the noise as `variance_noise`;
      DDPMScheduler.step draws it itself, so for it `randn_tensor` in diffusers' DDPM scheduler
      module is replaced by a function that returns `.noise` (asserted to be called exactly
      when t > 0).

  dpm_solver_steps.json, dpm_solver_steps.safetensors
      Whole runs of DPMSolverMultistepScheduler (algorithm_type "dpmsolver++") over the cases
      of DPM_CASES, one step after another, on synthetic model outputs. The JSON lists each
      case: the text of the scheduler config diffwgpu reads (as diffusers writes it, with
      Python's -Infinity; a DDPMScheduler config where the case swaps
      schedulers with DPMSolverMultistepScheduler.from_config, as a user does on a pipeline),
      num_inference_steps, the timesteps and sigmas that set_timesteps gave. For every step
      index i the safetensors hold `<case>.<i>.x_t`, `.model_output` and `.prev_sample`
      ([2, 3, 4, 4]); x_t of step i + 1 is prev_sample of step i. x_0 is fixed per case,
      x_T ~ N(0, I), and model_output is the exact prediction of the case's prediction_type
      at x_t plus 0.3 * randn. The steps are evaluated in float64 as the DDPM and DDIM steps
      above (the scheduler's float32 sigmas widened; its cast of the sample to float32 is
      exact, as every stored x_t is float32).

  dpm_solver_unet.safetensors
      A whole sampling run of the UNet2DModel of unets/first_level_attention with
      DPMSolverMultistepScheduler's defaults and 10 steps: `noise` (x_T, [2, 1, 8, 8]), the
      `x_t` before every step as `x_t.<i>`, and the final `sample`, the model evaluated in
      float64 as its reference above.

  class_guided_ddim.safetensors
      A whole classifier-free-guided sampling run of the UNet2DModel of unets/class_conditional
      with DDIMScheduler's defaults (eta 0, clip_sample) and 10 steps, the model evaluated in
      float64 as its reference above and the DDIM steps in float64 (its alphas_cumprod widened
      as for scheduler_steps):
        noise         x_T, torch.manual_seed(99) then randn [2, 1, 8, 8]
        labels        the class of each image, [3, 7] (float32, shape [2])
        guidance      the guidance scale w, [3.0] (shape [1])
        x_t.<i>       the sample before step i, i = 0..9
        sample        the final sample
      Each step evaluates the model once on the batch [x, x] (4 images) with the labels
      [labels, 10, 10] (10: the null class) and steps with eps = eps_uncond + w * (eps_cond -
      eps_uncond). The same run with w = 1, the conditional half alone evaluated (batch 2,
      labels [3, 7]), is stored as cond.x_t.<i> and cond.sample.

Regenerate (from the repository root):
    python3 -m venv .venv && .venv/bin/pip install torch diffusers safetensors numpy
    .venv/bin/python tools/diffusers_reference.py
or only the class-conditional files (unets/class_conditional/, its reference and
class_guided_ddim.safetensors):
    .venv/bin/python tools/diffusers_reference.py --only class_conditional
The versions used are printed and stored in the safetensors metadata.
"""
import argparse
import ast
import json
import math
import os
import re
import shutil
import sys
from unittest import mock

import diffusers
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel
from diffusers.schedulers import scheduling_ddpm
from safetensors.torch import load_file, save_file

# Must stay equal to PRESETS in tools/torch_baseline.py (checked at run time below) and to the
# presets of src/nn/config.rs.
PRESETS = {
    "tiny": dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8),
    "mnist": dict(sample_size=32, in_channels=1, out_channels=1, block_out_channels=(32, 64, 128), layers_per_block=2,
                  down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8),
    "cifar10": dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
                    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                    norm_num_groups=32, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0),
}

# Small models, each covering options the presets leave out; the fixtures folder stays small.
UNETS = {
    # Three levels, two resnets per level, one attention head (attention_head_dim null), two
    # input and three output channels, attention in the middle level only. (Not one channel
    # per group: a GroupNorm would then cancel the per-channel time embedding before it.)
    "three_levels": dict(sample_size=16, in_channels=2, out_channels=3, block_out_channels=(4, 8, 8), layers_per_block=2,
                         down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None, norm_num_groups=2),
    # The cifar10 preset's flags (sine-first embedding, frequency shift, asymmetric
    # downsampling padding, norm_eps 1e-6), act_fn spelled "swish", two heads, channel
    # counts that go up and down again.
    "cifar_flags": dict(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16, 8), layers_per_block=1,
                        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, norm_eps=1e-6,
                        flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, act_fn="swish"),
    # Attention at full resolution with 4-wide heads (2 heads there, 3 in the mid block),
    # attn_norm_num_groups (the mid block's attention only), sample_size as [height, width].
    "first_level_attention": dict(sample_size=(8, 8), in_channels=1, out_channels=1, block_out_channels=(8, 12), layers_per_block=1,
                                  down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                                  up_block_types=("UpBlock2D", "AttnUpBlock2D"), attention_head_dim=4, norm_num_groups=2,
                                  attn_norm_num_groups=4),
    # Class-conditional: nn.Embedding(num_class_embeds, time_embed_dim) of the labels added to
    # the time embedding (class_embed_type null). 10 classes and the null class NULL_CLASS of
    # classifier-free guidance.
    "class_conditional": dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                              down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                              up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4,
                              num_class_embeds=11),
}
# The labels of the references of class-conditional configs: a real class and the null class.
NULL_CLASS = 10
UNET_CLASS_LABELS = [3, NULL_CLASS]
OLD_NAMES_SOURCE = "first_level_attention"
OLD_ATTENTION_NAMES = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}

# (name, scheduler class, config, num_inference_steps, eta (DDIM only)); each case records
# the steps from the timesteps at step_indices(num_inference_steps).
COSINE = dict(beta_schedule="squaredcos_cap_v2", variance_type="fixed_large", clip_sample=False)
SCHEDULER_CASES = [
    ("ddpm_linear_epsilon_1000", DDPMScheduler, {}, 1000, None),
    ("ddpm_linear_v_leading_50", DDPMScheduler, dict(prediction_type="v_prediction"), 50, None),
    ("ddpm_linear_sample_linspace_50", DDPMScheduler,
     dict(prediction_type="sample", timestep_spacing="linspace", clip_sample_range=0.5), 50, None),
    ("ddpm_cosine_large_epsilon_leading_50", DDPMScheduler, COSINE, 50, None),
    ("ddpm_cosine_large_v_trailing_50", DDPMScheduler, dict(COSINE, prediction_type="v_prediction", timestep_spacing="trailing"), 50, None),
    ("ddpm_cosine_large_sample_1000", DDPMScheduler, dict(COSINE, prediction_type="sample"), 1000, None),
    ("ddim_linear_epsilon_leading_eta0", DDIMScheduler, {}, 50, 0.0),
    ("ddim_linear_epsilon_leading_eta1_alpha0_offset1", DDIMScheduler, dict(set_alpha_to_one=False, steps_offset=1), 50, 1.0),
    ("ddim_cosine_v_trailing_eta0_alpha0", DDIMScheduler,
     dict(beta_schedule="squaredcos_cap_v2", clip_sample=False, prediction_type="v_prediction", timestep_spacing="trailing",
          set_alpha_to_one=False), 50, 0.0),
    ("ddim_cosine_sample_trailing_eta1", DDIMScheduler,
     dict(beta_schedule="squaredcos_cap_v2", clip_sample=False, prediction_type="sample", timestep_spacing="trailing"), 50, 1.0),
    ("ddim_scaled_linear_epsilon_leading_eta05_alpha0_offset1", DDIMScheduler,
     dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False,
          steps_offset=1), 50, 0.5),
]
SCHEDULER_SAMPLE_SHAPE = (2, 3, 4, 4)

# (name, from_ddpm, config, num_inference_steps): DPMSolverMultistepScheduler(**config), or with
# from_ddpm its from_config of DDPMScheduler(**config)'s saved config.
DPM_CASES = [
    ("dpm_linear_epsilon_linspace_20", False, {}, 20),
    ("dpm_from_ddpm_v_leading_10", True, dict(prediction_type="v_prediction"), 10),
    ("dpm_cosine_sample_trailing_heun_sigma_min_clipped_25", False,
     dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample", timestep_spacing="trailing", solver_type="heun",
          final_sigmas_type="sigma_min", lambda_min_clipped=-5.1), 25),
    ("dpm_scaled_linear_epsilon_order1_leading_offset1_15", False,
     dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, solver_order=1, timestep_spacing="leading",
          steps_offset=1), 15),
    ("dpm_linear_epsilon_euler_at_final_sigma_min_16", False, dict(euler_at_final=True, final_sigmas_type="sigma_min"), 16),
    ("dpm_linear_v_sigma_min_12", False, dict(prediction_type="v_prediction", final_sigmas_type="sigma_min"), 12),
]
DPM_UNET = "first_level_attention"
DPM_UNET_STEPS = 10

# class_guided_ddim.safetensors: DDIMScheduler defaults, GUIDED_STEPS steps, classifier-free
# guidance of the model of unets/GUIDED_UNET at scale GUIDANCE, one image per label of GUIDED_LABELS.
GUIDED_UNET = "class_conditional"
GUIDED_STEPS = 10
GUIDED_LABELS = [3, 7]
GUIDANCE = 3.0

# What `--only NAME` writes (the default writes everything).
ONLY = ("class_conditional",)


def step_indices(n):
    """The steps recorded of n: the first two, one in the middle and the last two."""
    return [0, 1, n // 2, n - 2, n - 1]


TOOLS = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(os.path.dirname(TOOLS), "tests", "fixtures")


def check_presets_match_baseline():
    """torch_baseline.py runs a benchmark when imported, so read its PRESETS literal instead."""
    path = os.path.join(TOOLS, "torch_baseline.py")
    if not os.path.exists(path):
        return
    tree = ast.parse(open(path).read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PRESETS" for t in node.targets):
            theirs = eval(compile(ast.Expression(node.value), path, "eval"), {"dict": dict})
            if theirs != PRESETS:
                sys.exit("PRESETS differ from tools/torch_baseline.py; make them equal")
            return
    sys.exit("no PRESETS in tools/torch_baseline.py")


def write_param_listing(name, cfg):
    model = UNet2DModel(**cfg)
    lines = [f"{n} {','.join(str(d) for d in p.shape)}" for n, p in model.named_parameters()]
    total = sum(p.numel() for p in model.parameters())
    lines.append(f"total {total}")
    with open(os.path.join(FIXTURES, f"unet_params_{name}.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"unet_params_{name}.txt: {len(lines) - 1} parameters, total {total}")


class Float64Timesteps(torch.nn.Module):
    """diffusers' get_timestep_embedding evaluated in float64 (diffusers itself always uses float32):
    half = dim // 2; freq_i = exp(-ln(max_period) * i / (half - shift)), i = 0..half-1;
    emb = [sin(t * freq), cos(t * freq)], halves swapped to [cos, sin] when flip_sin_to_cos."""

    def __init__(self, dim, flip_sin_to_cos, shift, max_period=10000):
        super().__init__()
        self.dim, self.flip, self.shift, self.max_period = dim, flip_sin_to_cos, shift, max_period

    def forward(self, timesteps):
        half = self.dim // 2
        i = torch.arange(half, dtype=torch.float64, device=timesteps.device)
        freqs = torch.exp(-math.log(self.max_period) * i / (half - self.shift))
        arg = timesteps.to(torch.float64)[:, None] * freqs[None, :]
        emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)
        if self.flip:
            emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
        if self.dim % 2 == 1:
            emb = F.pad(emb, (0, 1, 0, 0))
        return emb


def forward_backward(model, x, t, target, class_labels=None):
    """out, loss, t_emb and the parameter gradients, in the model's dtype. class_labels (a
    LongTensor) only for a class-conditional model."""
    model.zero_grad(set_to_none=True)
    captured = {}
    hook = model.time_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("t_emb", o.detach()))
    out = model(x, t, class_labels=class_labels).sample
    hook.remove()
    loss = F.mse_loss(out, target)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return out.detach(), loss.detach(), captured["t_emb"], grads


def max_rel(a, b):
    """max |a - b| / max |b|"""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def perturbed_model(cfg):
    """UNet2DModel(**cfg) in float32 with diffusers' initialisation (from the torch seed the
    caller set), then every GroupNorm weight set to 1 + 0.1*randn and every bias shifted by
    0.1*randn, so that a swapped or ignored scale/shift shows up in a comparison."""
    model = UNet2DModel(**cfg)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.GroupNorm):
                mod.weight.copy_(1 + 0.1 * torch.randn_like(mod.weight))
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def float64_reference(model, x, t, target, label, class_labels=None):
    """out, loss, t_emb and the gradients of the float32 `model` evaluated in float64 (the model
    is converted in place). Prints how far diffusers' own float32 evaluation is from it.
    class_labels (a LongTensor) only for a class-conditional model."""
    params32 = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(p.dtype == torch.float32 for p in params32.values())

    # diffusers as it is, in float32: the figures a float32 implementation is compared with.
    out32, loss32, temb32, grads32 = forward_backward(model, x, t, target, class_labels)

    # The reference: the same float32 parameter values, evaluated in float64.
    model.double()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach().float(), params32[n])
    proj = model.time_proj
    model.time_proj = Float64Timesteps(proj.num_channels, proj.flip_sin_to_cos, proj.downscale_freq_shift)
    assert proj.scale == 1
    out, loss, temb, grads = forward_backward(model, x.double(), t.double(), target.double(), class_labels)
    model.time_proj = proj

    print(f"{label}: float32 diffusers vs float64 reference (max |diff| / max |ref|):")
    print(f"  t_emb {max_rel(temb32, temb):.2e}  out {max_rel(out32, out):.2e}  loss {max_rel(loss32, loss):.2e}")
    # The key bias adds the same q.b_k to every logit of a query row, which the softmax cancels:
    # its gradient is zero up to rounding, so it is left out of the relative comparison.
    key_bias = [n for n in grads if n.endswith("to_k.bias")]
    worst = max((n for n in grads if n not in key_bias), key=lambda n: max_rel(grads32[n], grads[n]))
    print(f"  worst gradient {worst}: {max_rel(grads32[worst], grads[worst]):.2e}")
    for n in key_bias:
        print(f"  {n} (zero in exact arithmetic): max |grad| float64 {grads[n].abs().max().item():.1e}, "
              f"float32 {grads32[n].abs().max().item():.1e}")
    assert max_rel(out32, out) < 1e-4 and max_rel(temb32, temb) < 1e-4
    return out, loss, temb, grads


def float64_unet(folder):
    """UNet2DModel.from_pretrained(folder) in float64, its timestep embedding computed in float64
    (Float64Timesteps)."""
    model = UNet2DModel.from_pretrained(folder).double()
    proj = model.time_proj
    model.time_proj = Float64Timesteps(proj.num_channels, proj.flip_sin_to_cos, proj.downscale_freq_shift)
    return model


def reference_tensors(out, loss, grads, x, t, target):
    """The float32 tensors of a reference file."""
    tensors = {f"grad.{n}": g.float() for n, g in grads.items()}
    tensors.update(x=x, t=t, out=out.float(), target=target, loss=loss.float().reshape(1))
    return tensors


def save_reference(path, tensors, metadata):
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    assert all(v.dtype == torch.float32 for v in tensors.values())
    metadata = dict(diffusers_version=diffusers.__version__, torch_version=torch.__version__, **metadata)
    save_file(tensors, path, metadata=metadata)
    print(f"{os.path.relpath(path, FIXTURES)}: {len(tensors)} tensors, {os.path.getsize(path)} bytes")


def write_tiny_reference():
    cfg = PRESETS["tiny"]
    torch.manual_seed(0)
    model = perturbed_model(cfg)
    x = torch.randn(2, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"])
    t = torch.tensor([37.0, 901.0])
    target = torch.randn(2, cfg["out_channels"], cfg["sample_size"], cfg["sample_size"])
    params = {f"param.{n}": p.detach().clone() for n, p in model.named_parameters()}
    out, loss, temb, grads = float64_reference(model, x, t, target, "tiny")
    tensors = dict(params, t_emb=temb.float(), **reference_tensors(out, loss, grads, x, t, target))
    save_reference(os.path.join(FIXTURES, "tiny_reference.safetensors"), tensors, {
        "preset": "tiny",
        "description": "UNet2DModel tiny preset: params, x, t, t_emb, out, target, mse loss and its "
                       "gradients; evaluated in float64 from the stored float32 params, stored as float32",
    })


def unet_seed(name):
    """The torch seed of the config `name`: its position in UNETS, from 1."""
    return list(UNETS).index(name) + 1


def write_unet_fixture(seed, name, cfg):
    """unets/<name>/ (the diffusers folder) and unets/<name>_reference.safetensors. Returns x, t,
    out and the class labels (float32; None unless the config has num_class_embeds)."""
    torch.manual_seed(seed)
    model = perturbed_model(cfg)
    folder = os.path.join(FIXTURES, "unets", name)
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder)
    size = model.config.sample_size
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(2, cfg["in_channels"], h, w)
    # Between them the configs see both ends of the timestep range and two values inside.
    t = torch.tensor([3.0, 640.0]) if seed % 2 else torch.tensor([999.0, 0.0])
    target = torch.randn(2, cfg["out_channels"], h, w)
    labels = None
    if cfg.get("num_class_embeds") is not None:
        labels = torch.tensor(UNET_CLASS_LABELS, dtype=torch.float32)
        assert len(labels) == len(x)
    out, loss, _, grads = float64_reference(model, x, t, target, name, None if labels is None else labels.long())
    count = sum(p.numel() for p in model.parameters())
    tensors = reference_tensors(out, loss, grads, x, t, target)
    if labels is not None:
        tensors["class_labels"] = labels
    save_reference(os.path.join(FIXTURES, "unets", f"{name}_reference.safetensors"), tensors, {
        "config": name,
        "description": f"UNet2DModel of unets/{name} ({count} parameters): x, t, "
                       f"{'' if labels is None else 'class_labels, '}out, target, mse loss and its "
                       "gradients; evaluated in float64 from the folder's float32 weights, stored as float32",
    })
    return x, t, out, labels


def check_unet_folder(name, x, t, out, labels):
    """diffusers loads unets/<name>/ back (from_pretrained: config and weights) with the output
    of its reference."""
    model = float64_unet(os.path.join(FIXTURES, "unets", name))
    with torch.no_grad():
        again = model(x.double(), t.double(), class_labels=None if labels is None else labels.long()).sample
    assert max_rel(again, out) < 1e-12, max_rel(again, out)
    print(f"unets/{name}: loads in diffusers with the same output")


def write_old_names_fixture(name, x, t, out):
    """unets/<name>_old_names/: the folder of `name` with the attention keys of older diffusers."""
    source = os.path.join(FIXTURES, "unets", name)
    folder = f"{source}_old_names"
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    shutil.copy(os.path.join(source, "config.json"), folder)
    weights = "diffusion_pytorch_model.safetensors"
    renamed = {}
    for key, value in load_file(os.path.join(source, weights)).items():
        for new, old in OLD_ATTENTION_NAMES.items():
            key = key.replace(new, old)
        renamed[key] = value
    assert any(".query." in k for k in renamed) and not any(".to_q." in k for k in renamed)
    save_file(renamed, os.path.join(folder, weights), metadata={"format": "pt"})
    # diffusers converts the old names on loading and computes the same output.
    model = float64_unet(folder)
    with torch.no_grad():
        again = model(x.double(), t.double()).sample
    assert max_rel(again, out) < 1e-12, max_rel(again, out)
    print(f"unets/{name}_old_names: {len(renamed)} tensors, loads in diffusers with the same output")


def prediction(prediction_type, x0, eps, alpha_prod):
    """What a perfect model of `prediction_type` outputs at x_t = q_sample(x0, eps)."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    return alpha_prod.sqrt() * eps - (1 - alpha_prod).sqrt() * x0


def scheduler_step(scheduler, eta, model_output, t, x_t, noise):
    """prev_sample of one step of `scheduler` in the dtype of the inputs, with `noise` as the
    step's noise."""
    if isinstance(scheduler, DDIMScheduler):
        return scheduler.step(model_output, t, x_t, eta=eta, variance_noise=noise).prev_sample
    draws = []

    def fixed_noise(shape, generator=None, device=None, dtype=None):
        assert tuple(shape) == tuple(noise.shape) and dtype == noise.dtype
        draws.append(shape)
        return noise.clone()

    with mock.patch.object(scheduling_ddpm, "randn_tensor", fixed_noise):
        prev = scheduler.step(model_output, t, x_t).prev_sample
    assert len(draws) == (1 if t > 0 else 0), (t, draws)
    return prev


def float64_scheduler(scheduler):
    """A copy of `scheduler` whose float32 tables are widened to float64."""
    wide = type(scheduler).from_config(scheduler.config)
    wide.set_timesteps(scheduler.num_inference_steps)
    wide.alphas_cumprod = scheduler.alphas_cumprod.double()
    for name in ("one", "final_alpha_cumprod"):
        if hasattr(scheduler, name):
            setattr(wide, name, getattr(scheduler, name).double())
    return wide


def write_scheduler_steps():
    torch.manual_seed(1234)
    tensors, cases = {}, []
    for name, cls, overrides, steps, eta in SCHEDULER_CASES:
        scheduler = cls(**overrides)
        scheduler.set_timesteps(steps)
        wide = float64_scheduler(scheduler)
        timesteps = scheduler.timesteps.tolist()
        stepped = [timesteps[i] for i in step_indices(steps)]
        tensors[f"{name}.alphas_cumprod"] = scheduler.alphas_cumprod.clone()
        worst32 = 0.0
        for t in stepped:
            alpha_prod = scheduler.alphas_cumprod[t]
            x0 = 1.2 * (2 * torch.rand(SCHEDULER_SAMPLE_SHAPE) - 1)
            eps = torch.randn(SCHEDULER_SAMPLE_SHAPE)
            x_t = alpha_prod.sqrt() * x0 + (1 - alpha_prod).sqrt() * eps
            model_output = prediction(scheduler.config.prediction_type, x0, eps, alpha_prod)
            model_output = model_output + 0.3 * torch.randn(SCHEDULER_SAMPLE_SHAPE)
            noise = torch.randn(SCHEDULER_SAMPLE_SHAPE)
            prev32 = scheduler_step(scheduler, eta, model_output, t, x_t, noise)
            prev = scheduler_step(wide, eta, model_output.double(), t, x_t.double(), noise.double())
            assert prev.dtype == torch.float64
            worst32 = max(worst32, max_rel(prev32, prev))
            for key, value in dict(x_t=x_t, model_output=model_output, noise=noise, prev_sample=prev).items():
                tensors[f"{name}.{t}.{key}"] = value.float().contiguous()
        print(f"{name}: float32 diffusers vs float64 reference, worst step {worst32:.1e}")
        cases.append({
            "name": name,
            "config": json.loads(scheduler.to_json_string()),
            "num_inference_steps": steps,
            "eta": eta,
            "timesteps": timesteps,
            "steps": stepped,
        })
    save_reference(os.path.join(FIXTURES, "scheduler_steps.safetensors"), tensors, {
        "description": "DDPMScheduler and DDIMScheduler steps of the cases of scheduler_steps.json: "
                       "<case>.<t>.{x_t, model_output, noise, prev_sample} and <case>.alphas_cumprod; "
                       "prev_sample evaluated in float64 from the stored float32 inputs and alphas_cumprod",
    })
    text = json.dumps({"diffusers_version": diffusers.__version__, "cases": cases}, indent=1)
    # Lists of timesteps on one line each.
    text = re.sub(r"\[([\d,\s]+)\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    with open(os.path.join(FIXTURES, "scheduler_steps.json"), "w") as f:
        f.write(text + "\n")
    print(f"scheduler_steps.json: {len(cases)} cases")


def float64_dpm_solver(scheduler):
    """A copy of DPMSolverMultistepScheduler `scheduler` whose float32 sigmas are widened to
    float64."""
    wide = DPMSolverMultistepScheduler.from_config(scheduler.config)
    wide.set_timesteps(scheduler.num_inference_steps)
    assert torch.equal(wide.timesteps, scheduler.timesteps)
    wide.sigmas = scheduler.sigmas.double()
    return wide


def dpm_scheduler(from_ddpm, config):
    """The case's scheduler, and the config text diffwgpu is given."""
    if from_ddpm:
        text = DDPMScheduler(**config).to_json_string()
        return DPMSolverMultistepScheduler.from_config(json.loads(text)), text
    scheduler = DPMSolverMultistepScheduler(**config)
    return scheduler, scheduler.to_json_string()


def write_dpm_solver_steps():
    torch.manual_seed(4321)
    tensors, cases = {}, []
    for name, from_ddpm, config, steps in DPM_CASES:
        scheduler, text = dpm_scheduler(from_ddpm, config)
        scheduler.set_timesteps(steps)
        wide = float64_dpm_solver(scheduler)
        prediction_type = scheduler.config.prediction_type
        x0 = 1.2 * (2 * torch.rand(SCHEDULER_SAMPLE_SHAPE, dtype=torch.float64) - 1)
        x = torch.randn(SCHEDULER_SAMPLE_SHAPE).double()
        for i, t in enumerate(scheduler.timesteps.tolist()):
            alpha_prod = scheduler.alphas_cumprod[t].double()
            eps = (x - alpha_prod.sqrt() * x0) / (1 - alpha_prod).sqrt()
            model_output = prediction(prediction_type, x0, eps, alpha_prod)
            model_output = (model_output + 0.3 * torch.randn(SCHEDULER_SAMPLE_SHAPE)).float()
            prev = wide.step(model_output.double(), t, x).prev_sample
            assert prev.dtype == torch.float64
            for key, value in dict(x_t=x, model_output=model_output, prev_sample=prev).items():
                tensors[f"{name}.{i}.{key}"] = value.float().contiguous()
            x = prev.float().double()
        print(f"{name}: {len(scheduler.timesteps)} steps")
        cases.append({
            "name": name,
            "config": text,
            "num_inference_steps": steps,
            "timesteps": scheduler.timesteps.tolist(),
            "sigmas": scheduler.sigmas.tolist(),
        })
    save_reference(os.path.join(FIXTURES, "dpm_solver_steps.safetensors"), tensors, {
        "description": "DPMSolverMultistepScheduler runs of the cases of dpm_solver_steps.json: "
                       "<case>.<i>.{x_t, model_output, prev_sample}; prev_sample evaluated in float64",
    })
    text = json.dumps({"diffusers_version": diffusers.__version__, "cases": cases}, indent=1)
    text = re.sub(r"\[([-\d.e,\s]+)\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    with open(os.path.join(FIXTURES, "dpm_solver_steps.json"), "w") as f:
        f.write(text + "\n")
    print(f"dpm_solver_steps.json: {len(cases)} cases")


def write_dpm_solver_unet():
    model = float64_unet(os.path.join(FIXTURES, "unets", DPM_UNET))
    scheduler = DPMSolverMultistepScheduler()
    scheduler.set_timesteps(DPM_UNET_STEPS)
    wide = float64_dpm_solver(scheduler)
    torch.manual_seed(99)
    h, w = model.config.sample_size
    noise = torch.randn(2, model.config.in_channels, h, w)
    tensors, x = {"noise": noise}, noise.double()
    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            tensors[f"x_t.{i}"] = x.float()
            out = model(x, torch.full((x.shape[0],), float(t), dtype=torch.float64)).sample
            x = wide.step(out, t, x).prev_sample
    tensors["sample"] = x.float()
    save_reference(os.path.join(FIXTURES, "dpm_solver_unet.safetensors"), tensors, {
        "config": DPM_UNET,
        "description": f"DPMSolverMultistepScheduler defaults, {DPM_UNET_STEPS} steps, with the UNet2DModel of "
                       f"unets/{DPM_UNET} evaluated in float64: noise, x_t.<i>, sample",
    })


def guided_ddim_run(model, scheduler, noise, labels, guidance):
    """x_t before every step of `scheduler` (DDIM, eta 0) from x_T = noise, and the final sample,
    in the dtype of `model`. With guidance w the model is evaluated once per step on the batch
    [x, x] with labels [labels, NULL_CLASS...], eps = eps_uncond + w * (eps_cond - eps_uncond);
    with guidance None on x with `labels` alone (the conditional model, w = 1)."""
    dtype = next(model.parameters()).dtype
    x, xs = noise.to(dtype), []
    n = len(x)
    with torch.no_grad():
        for t in scheduler.timesteps:
            xs.append(x)
            if guidance is None:
                eps = model(x, torch.full((n,), float(t), dtype=dtype), class_labels=labels).sample
            else:
                both = torch.cat([labels, torch.full_like(labels, NULL_CLASS)])
                out = model(torch.cat([x, x]), torch.full((2 * n,), float(t), dtype=dtype), class_labels=both).sample
                cond, uncond = out.chunk(2)
                eps = uncond + guidance * (cond - uncond)
            x = scheduler.step(eps, t, x).prev_sample
            assert x.dtype == dtype
    return xs, x


def write_class_guided_ddim():
    folder = os.path.join(FIXTURES, "unets", GUIDED_UNET)
    model = float64_unet(folder)
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(GUIDED_STEPS)
    wide = float64_scheduler(scheduler)
    torch.manual_seed(99)
    size = model.config.sample_size
    noise = torch.randn(len(GUIDED_LABELS), model.config.in_channels, size, size)
    labels = torch.tensor(GUIDED_LABELS, dtype=torch.float32)
    tensors = {"noise": noise, "labels": labels, "guidance": torch.tensor([GUIDANCE])}
    model32 = UNet2DModel.from_pretrained(folder)
    for prefix, guidance in (("", GUIDANCE), ("cond.", None)):
        xs, sample = guided_ddim_run(model, wide, noise, labels.long(), guidance)
        for i, x in enumerate(xs):
            tensors[f"{prefix}x_t.{i}"] = x.float()
        tensors[f"{prefix}sample"] = sample.float()
        # diffusers as it is, in float32: a guide to the tolerance of a float32 sampler.
        _, sample32 = guided_ddim_run(model32, scheduler, noise, labels.long(), guidance)
        print(f"class_guided_ddim {prefix or 'guided.'}sample: float32 diffusers vs float64 reference "
              f"(max |diff| / max |ref|) {max_rel(sample32, sample):.2e}")
    save_reference(os.path.join(FIXTURES, "class_guided_ddim.safetensors"), tensors, {
        "config": GUIDED_UNET,
        "description": f"DDIMScheduler defaults (eta 0), {GUIDED_STEPS} steps, with the class-conditional UNet2DModel "
                       f"of unets/{GUIDED_UNET} evaluated in float64, classifier-free guidance: each step evaluates "
                       f"the batch [x, x] with labels [labels, {NULL_CLASS}, {NULL_CLASS}] (null class "
                       f"{NULL_CLASS}) and takes eps = eps_uncond + guidance * (eps_cond - eps_uncond): noise, labels, "
                       "guidance, x_t.<i>, sample; the same run with guidance 1 (the conditional half alone): "
                       "cond.x_t.<i>, cond.sample",
    })


def write_class_conditional():
    """The fixtures of the class-conditional model: unets/class_conditional/, its reference and
    class_guided_ddim.safetensors."""
    name = "class_conditional"
    x, t, out, labels = write_unet_fixture(unet_seed(name), name, UNETS[name])
    check_unet_folder(name, x, t, out, labels)
    write_class_guided_ddim()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=ONLY,
                        help="write only these fixtures (class_conditional: unets/class_conditional/, "
                             "its reference and class_guided_ddim.safetensors); default: everything")
    args = parser.parse_args()
    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}")
    os.makedirs(os.path.join(FIXTURES, "unets"), exist_ok=True)
    if args.only == "class_conditional":
        write_class_conditional()
        return
    check_presets_match_baseline()
    for name, cfg in PRESETS.items():
        write_param_listing(name, cfg)
    write_tiny_reference()
    for seed, (name, cfg) in enumerate(UNETS.items(), start=1):
        x, t, out, labels = write_unet_fixture(seed, name, cfg)
        check_unet_folder(name, x, t, out, labels)
        if name == OLD_NAMES_SOURCE:
            write_old_names_fixture(name, x, t, out)
    write_scheduler_steps()
    write_dpm_solver_steps()
    write_dpm_solver_unet()
    write_class_guided_ddim()


if __name__ == "__main__":
    main()
