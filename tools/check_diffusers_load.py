"""Checks that diffusers loads a pipeline folder written by `diffwgpu train` and samples from it.

Loads FOLDER with `diffusers.DDPMPipeline.from_pretrained`, then:
  - the UNet's weights must match its config exactly (no missing, unexpected or misshapen
    tensors, as reported by `UNet2DModel.from_pretrained(..., output_loading_info=True)`);
  - the pipeline generates a batch of images with a few DDPM steps; they must have the
    config's size and channels and be finite values in [0, 1]. A class-conditional UNet
    (num_class_embeds; DDPMPipeline has no class input) is sampled by the same DDPM loop
    written out, with class --class-id and classifier-free guidance --guidance under the
    null class of unet/class_labels.json.
With --noise X.safetensors (tensor `noise`, [N, C, H, W]) and --expect S.safetensors (tensor
`samples`, as `diffwgpu sample --noise X --save-tensor S --sampler ddim --eta 0` writes them),
it also runs DDIM from that noise with the same steps, class and guidance, and the samples
must match diffwgpu's within --atol.
Prints the diffusers and torch versions, the parameter count and the image statistics
(diffusers prints its own warnings, such as ignored config keys, to stderr). Exits non-zero on the first failed check.

Set-up and use (from the repository root):
    python3 -m venv .venv && .venv/bin/pip install torch diffusers safetensors
    .venv/bin/python tools/check_diffusers_load.py OUT [--images 4] [--steps 20]
        [--class-id 3 --guidance 3] [--noise X.safetensors --expect S.safetensors]
"""
import argparse
import json
import os
import sys

import diffusers
import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel
from safetensors.torch import load_file


def fail(msg):
    sys.exit(f"FAIL: {msg}")


def class_labels(folder, unet):
    """The class names and null class of a conditional UNet (ids and none without the file)."""
    path = os.path.join(folder, "unet", "class_labels.json")
    if os.path.exists(path):
        with open(path) as f:
            labels = json.load(f)
        return labels["names"], labels["null_class"]
    return [str(i) for i in range(unet.config.num_class_embeds)], None


def denoise(unet, scheduler, x, class_id, null_class, guidance, generator=None):
    """The reverse process from x over scheduler.timesteps; a conditional UNet with
    classifier-free guidance: eps_u + w (eps_c - eps_u), both halves in one batch."""
    n = x.shape[0]
    for t in scheduler.timesteps:
        with torch.no_grad():
            if unet.config.num_class_embeds is None:
                eps = unet(x, t).sample
            elif guidance == 1.0:
                eps = unet(x, t, class_labels=torch.full((n,), class_id)).sample
            else:
                labels = torch.tensor([class_id] * n + [null_class] * n)
                both = unet(torch.cat([x, x]), t, class_labels=labels).sample
                eps_c, eps_u = both[:n], both[n:]
                eps = eps_u + guidance * (eps_c - eps_u)
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    return x


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="the output folder of `diffwgpu train`")
    parser.add_argument("--images", type=int, default=4, help="how many images to generate")
    parser.add_argument("--steps", type=int, default=20, help="DDPM inference steps")
    parser.add_argument("--class-id", type=int, default=0, help="a conditional model's class")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    parser.add_argument("--noise", help="x_T for the DDIM comparison (tensor `noise`)")
    parser.add_argument("--expect", help="diffwgpu's DDIM samples from --noise (tensor `samples`)")
    parser.add_argument("--atol", type=float, default=1e-3, help="tolerance of the comparison")
    args = parser.parse_args()
    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}")

    try:
        pipeline = DDPMPipeline.from_pretrained(args.folder)
        _, info = UNet2DModel.from_pretrained(args.folder, subfolder="unet", output_loading_info=True)
    except Exception as e:  # diffusers raises many kinds; report whichever it is
        fail(f"diffusers cannot load {args.folder}: {type(e).__name__}: {e}")
    problems = {k: v for k, v in info.items() if v}
    if problems:
        fail(f"the UNet weights do not match its config: {problems}")

    unet, scheduler = pipeline.unet, pipeline.scheduler
    print(f"loaded {type(unet).__name__} with {sum(p.numel() for p in unet.parameters())} parameters "
          f"and {type(scheduler).__name__} ({scheduler.config.num_train_timesteps} timesteps, "
          f"{scheduler.config.beta_schedule}, {scheduler.config.prediction_type})")

    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    generator = torch.Generator().manual_seed(0)
    null_class = None
    if unet.config.num_class_embeds is None:
        pipeline.set_progress_bar_config(disable=True)
        images = pipeline(batch_size=args.images, num_inference_steps=args.steps, generator=generator,
                          output_type="np").images
    else:
        names, null_class = class_labels(args.folder, unet)
        if null_class is None and args.guidance != 1.0:
            fail("the model has no null class; use --guidance 1")
        print(f"class-conditional: classes {names}, null class {null_class}; drawing class "
              f"{names[args.class_id]} with guidance {args.guidance}")
        scheduler.set_timesteps(args.steps)
        x = torch.randn(args.images, unet.config.in_channels, height, width, generator=generator)
        x = denoise(unet, scheduler, x, args.class_id, null_class, args.guidance, generator)
        images = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    want = (args.images, height, width, unet.config.out_channels)
    if images.shape != want:
        fail(f"images of shape {images.shape}, expected {want}")
    if not np.isfinite(images).all():
        fail("the images have non-finite values")
    if images.min() < 0 or images.max() > 1:
        fail(f"image values outside [0, 1]: {images.min()} .. {images.max()}")
    print(f"generated {args.images} images of {height}x{width}x{want[3]} in {args.steps} steps: "
          f"mean {images.mean():.4f}, std {images.std():.4f}, min {images.min():.4f}, max {images.max():.4f}")
    if args.noise:
        noise = load_file(args.noise)["noise"]
        expect = load_file(args.expect)["samples"]
        ddim = DDIMScheduler.from_config(scheduler.config)
        ddim.set_timesteps(args.steps)
        got = denoise(unet, ddim, noise, args.class_id, null_class, args.guidance)
        diff = (got - expect).abs().max().item()
        print(f"DDIM {args.steps} steps from {args.noise}: max |diffusers - diffwgpu| = {diff:.2e}")
        if diff > args.atol:
            fail(f"diffusers' samples differ from diffwgpu's by {diff} > {args.atol}")
    print("OK")


if __name__ == "__main__":
    main()
