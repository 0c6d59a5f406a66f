"""PyTorch side of the sampling speed comparison: diffusers' DDPMPipeline (ancestral, every
timestep) and DDIMPipeline (50 steps, eta 0) on a pipeline folder that `diffwgpu train` wrote,
timed on this machine's CPU. Compare with `diffwgpu sample` on the same folder and image count.
Set-up: python3 -m venv .venv && .venv/bin/pip install torch diffusers safetensors
Usage:  .venv/bin/python tools/torch_sample_baseline.py FOLDER [images] [ddpm steps]"""
import sys, time, torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline

folder = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 16
ddpm_steps = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
ddpm = DDPMPipeline.from_pretrained(folder)
ddim = DDIMPipeline(unet=ddpm.unet, scheduler=DDIMScheduler.from_config(ddpm.scheduler.config))
for name, pipe, steps in [("ddim", ddim, 50), ("ddpm", ddpm, ddpm_steps)]:
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        t0 = time.perf_counter()
        pipe(batch_size=n, num_inference_steps=steps, generator=g, output_type="np")
        secs = time.perf_counter() - t0
    print(f"{name} steps={steps} images={n} threads={torch.get_num_threads()} "
          f"seconds={secs:.2f} images_per_s={n / secs:.3f}")
