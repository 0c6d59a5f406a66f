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

Regenerate (from the repository root):
    python3 -m venv .venv && .venv/bin/pip install torch diffusers safetensors numpy
    .venv/bin/python tools/diffusers_reference.py
The versions used are printed and stored in the safetensors metadata.
"""
import ast
import math
import os
import sys

import diffusers
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from safetensors.torch import save_file

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


def forward_backward(model, x, t, target):
    """out, loss, t_emb and the parameter gradients, in the model's dtype."""
    model.zero_grad(set_to_none=True)
    captured = {}
    hook = model.time_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("t_emb", o.detach()))
    out = model(x, t).sample
    hook.remove()
    loss = F.mse_loss(out, target)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return out.detach(), loss.detach(), captured["t_emb"], grads


def max_rel(a, b):
    """max |a - b| / max |b|"""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def write_tiny_reference():
    cfg = PRESETS["tiny"]
    torch.manual_seed(0)
    model = UNet2DModel(**cfg)  # float32, diffusers' default initialisation
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.GroupNorm):
                mod.weight.copy_(1 + 0.1 * torch.randn_like(mod.weight))
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"])
    t = torch.tensor([37.0, 901.0])
    target = torch.randn(2, cfg["out_channels"], cfg["sample_size"], cfg["sample_size"])
    params32 = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(p.dtype == torch.float32 for p in params32.values())

    # diffusers as it is, in float32: the figures a float32 implementation is compared with.
    out32, loss32, temb32, grads32 = forward_backward(model, x, t, target)

    # The reference: the same float32 parameter values, evaluated in float64.
    model = model.double()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach().float(), params32[n])
    proj = model.time_proj
    model.time_proj = Float64Timesteps(proj.num_channels, proj.flip_sin_to_cos, proj.downscale_freq_shift)
    assert proj.scale == 1
    out, loss, temb, grads = forward_backward(model, x.double(), t.double(), target.double())

    print("float32 diffusers vs float64 reference (max |diff| / max |ref|):")
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

    tensors = {f"param.{n}": p for n, p in params32.items()}
    tensors.update({f"grad.{n}": g.float() for n, g in grads.items()})
    tensors.update(x=x, t=t, t_emb=temb.float(), out=out.float(), target=target, loss=loss.float().reshape(1))
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    assert all(v.dtype == torch.float32 for v in tensors.values())
    metadata = {
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
        "preset": "tiny",
        "description": "UNet2DModel tiny preset: params, x, t, t_emb, out, target, mse loss and its "
                       "gradients; evaluated in float64 from the stored float32 params, stored as float32",
    }
    path = os.path.join(FIXTURES, "tiny_reference.safetensors")
    save_file(tensors, path, metadata=metadata)
    print(f"tiny_reference.safetensors: {len(tensors)} tensors, {os.path.getsize(path)} bytes, loss {loss.item():.6f}")


def main():
    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}")
    check_presets_match_baseline()
    os.makedirs(FIXTURES, exist_ok=True)
    for name, cfg in PRESETS.items():
        write_param_listing(name, cfg)
    write_tiny_reference()


if __name__ == "__main__":
    main()
