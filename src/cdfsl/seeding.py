"""Explicit random streams: every draw is a pure function of (seed, episode index, purpose).

Each purpose (episode sampling, support views, LoRA init and dropout of each tower, batch order, VtT init, MaPLe
init) has its own stream, so two methods see the same views and the same LoRA start on the same episode, and a batch of
E episodes gives each one the same draws as running it alone.
"""

from __future__ import annotations

import numpy as np
import torch

# Fixed purpose codes: changing one changes every stored result, so never renumber.
PURPOSES = {
    "episode": 0,
    "views": 1,
    "lora_init": 2,
    "batch_order": 3,
    "dropout": 4,
    "vtt_init": 5,
    "probe": 6,
    "text_lora_init": 7,
    "text_dropout": 8,
    "maple_init": 9,
    "fit_shots": 10,  # the classifier's draw of K images per class (stream index = the class's label)
    "allway_train": 11,  # the all-way draw of K train images per class (stream index = the class's label)
    "allway_val": 12,  # the all-way draw of min(K, 4) val images per class (stream index = the class's label)
}


def seed_of(seed: int, episode: int, purpose: str) -> int:
    """A 63-bit integer seed for one (seed, episode, purpose) stream."""
    if purpose not in PURPOSES:
        raise KeyError(f"unknown random stream {purpose!r}; known: {', '.join(PURPOSES)}")
    sequence = np.random.SeedSequence([seed, episode, PURPOSES[purpose]])
    return int(sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def numpy_stream(seed: int, episode: int, purpose: str) -> np.random.Generator:
    return np.random.default_rng(seed_of(seed, episode, purpose))


def torch_stream(seed: int, episode: int, purpose: str, device: torch.device | str = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed_of(seed, episode, purpose))
    return generator
