"""Backbones: the open_clip adapter and its vision towers (open_clip ViTs, timm trunks), tokenizers,
episode-batched LoRA, the catalogue, the embedded tiny CLIP and the small test models."""
