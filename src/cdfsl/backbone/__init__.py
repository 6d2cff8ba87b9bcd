"""Backbones: the open_clip adapter, episode-batched LoRA, the embedded tiny CLIP."""
