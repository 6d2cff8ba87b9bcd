"""Dataset readers, the episode sampler, and the image pipeline (decode, cache, augment)."""

import cdfsl.data.md_sampler  # noqa: F401  (registers the `meta-dataset` protocol beside `fixed-way`)
