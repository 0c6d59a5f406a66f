//! Checkpoints: safetensors tensors, diffusers config files and the pipeline folder a run writes.
