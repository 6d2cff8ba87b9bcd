"""Dataset readers, the episode sampler, and the image pipeline (decode, cache, augment)."""
