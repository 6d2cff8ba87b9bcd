"""The generated source domain and the tiny CLIP pretraining loop (embedded.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cdfsl.backbone.tiny import create_tiny_model
from cdfsl.backbone.trimmed_text import encode_text_trimmed
from cdfsl.pretrain.source_domain import (
    CONCEPTS,
    DIGIT_NAMES,
    IMAGE_SIZE,
    NUM_CONCEPTS,
    digit_prompt,
    generate_batch,
)
from cdfsl.pretrain.train_tiny import (
    MAX_CHECKPOINT_BYTES,
    _CaptionTokens,
    digits_target,
    label_aware_loss,
    pretrain_tiny,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_same_seed_same_batch():
    first = generate_batch(np.random.default_rng(7), 48)
    second = generate_batch(np.random.default_rng(7), 48)
    np.testing.assert_array_equal(first[0], second[0])
    assert first[1] == second[1]
    np.testing.assert_array_equal(first[2], second[2])
    other = generate_batch(np.random.default_rng(8), 48)
    assert not np.array_equal(first[0], other[0])


def test_shapes_and_dtypes():
    images, captions, concepts = generate_batch(np.random.default_rng(0), 40)
    assert images.shape == (40, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
    assert len(captions) == 40 and all(isinstance(c, str) and c for c in captions)
    assert concepts.shape == (40,) and concepts.dtype == np.int64
    assert concepts.min() >= 0 and concepts.max() < NUM_CONCEPTS == len(CONCEPTS)
    assert images.std() > 10  # not blank


def test_digit_captions_use_the_evaluation_prompt():
    _, captions, concepts = generate_batch(np.random.default_rng(0), 600)
    assert "a photo of a seven." in captions
    for digit in range(10):
        assert digit_prompt(digit) in {c for c, k in zip(captions, concepts, strict=True) if k == digit}
    for caption, concept in zip(captions, concepts, strict=True):
        if concept < 10:
            assert DIGIT_NAMES[concept] in caption or str(concept) in caption.split()
        else:
            assert not any(caption == digit_prompt(d) for d in range(10))


def test_target_digits():
    images, labels = digits_target()
    assert images.shape == (1797, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
    assert set(labels.tolist()) == set(range(10))
    np.testing.assert_array_equal(images[..., 0], images[..., 2])  # grey


def test_trimmed_text_encoding_is_exact():
    torch.manual_seed(0)
    model = create_tiny_model(load_weights=False)
    _, captions, _ = generate_batch(np.random.default_rng(1), 16)
    tokens = _CaptionTokens()(captions)
    with torch.no_grad():
        torch.testing.assert_close(encode_text_trimmed(model, tokens), model.encode_text(tokens))


def test_label_aware_loss_prefers_matching_logits():
    positives = torch.tensor([[True, False], [True, False], [False, True]])
    good = label_aware_loss(torch.where(positives, 5.0, -5.0), positives)
    bad = label_aware_loss(torch.where(positives, -5.0, 5.0), positives)
    assert good < 0.5 < bad


def test_pretrain_smoke(tmp_path):
    records: list[dict] = []
    out = tmp_path / "m.safetensors"
    meta = pretrain_tiny(
        out,
        steps=3,
        seed=0,
        threads=1,
        log=records.append,
        supervised_steps=1,
        batch_size=16,
        log_every=1,
        eval_episodes=2,
    )
    assert out.is_file() and out.stat().st_size <= MAX_CHECKPOINT_BYTES
    state = load_file(str(out))
    assert all(v.dtype == torch.float16 for v in state.values())
    model = create_tiny_model(load_weights=False)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    stored = json.loads(out.with_suffix(".meta.json").read_text())
    assert stored == meta
    assert stored["steps"] == 3 and stored["seed"] == 0 and stored["threads"] == 1
    assert 0.0 <= stored["zero_shot_digits_5way"] <= 1.0 and stored["torch"] == torch.__version__
    phases = [r["phase"] for r in records]
    assert phases.count("supervised") == 1 and phases.count("contrastive") == 2 and phases[-1] == "zero_shot"
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
