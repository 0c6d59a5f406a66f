"""Checks that diffusers loads a pipeline folder written by `diffwgpu train` and samples from it.

Loads FOLDER with `diffusers.DDPMPipeline.from_pretrained`, then:
  - the UNet's weights must match its config exactly (no missing, unexpected or misshapen
    tensors, as reported by `UNet2DModel.from_pretrained(..., output_loading_info=True)`);
  - the pipeline generates a batch of images with a few DDPM steps; they must have the
    config's size and channels and be finite values in [0, 1].
Prints the diffusers and torch versions, the parameter count and the image statistics
(diffusers prints its own warnings, such as ignored config keys, to stderr). Exits non-zero on the first failed check.

Set-up and use (from the repository root):
    python3 -m venv .venv && .venv/bin/pip install torch diffusers safetensors
    .venv/bin/python tools/check_diffusers_load.py OUT [--images 4] [--steps 20]
"""
import argparse
import sys

import diffusers
import numpy as np
import torch
from diffusers import DDPMPipeline, UNet2DModel


def fail(msg):
    sys.exit(f"FAIL: {msg}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="the output folder of `diffwgpu train`")
    parser.add_argument("--images", type=int, default=4, help="how many images to generate")
    parser.add_argument("--steps", type=int, default=20, help="DDPM inference steps")
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

    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    images = pipeline(batch_size=args.images, num_inference_steps=args.steps, generator=generator,
                      output_type="np").images
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    want = (args.images, height, width, unet.config.out_channels)
    if images.shape != want:
        fail(f"images of shape {images.shape}, expected {want}")
    if not np.isfinite(images).all():
        fail("the images have non-finite values")
    if images.min() < 0 or images.max() > 1:
        fail(f"image values outside [0, 1]: {images.min()} .. {images.max()}")
    print(f"generated {args.images} images of {height}x{width}x{want[3]} in {args.steps} steps: "
          f"mean {images.mean():.4f}, std {images.std():.4f}, min {images.min():.4f}, max {images.max():.4f}")
    print("OK")


if __name__ == "__main__":
    main()
