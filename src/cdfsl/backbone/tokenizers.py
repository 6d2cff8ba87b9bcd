"""A backbone's text tokenizer: open_clip's BPE tokenizer, or a Hugging Face tokenizer (SigLIP / SigLIP2).

Chosen from the model config, never from the model's name (open_clip's `get_tokenizer` also guesses from names
containing "siglip"): a config with `hf_tokenizer_name` gets that Hugging Face tokenizer, every other config open_clip's
`SimpleTokenizer` at the config's context length.

A Hugging Face tokenizer needs the optional `transformers` package (`pip install "cdfsl[siglip]"`) and its files: from
the Hugging Face cache (downloaded when online), or from a local folder (`--tokenizer DIR`, e.g. one written by
`AutoTokenizer.from_pretrained(NAME).save_pretrained(DIR)` on a machine with internet). Offline without either, the
error says so at once instead of after the hub's retries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor

from cdfsl.backbone.downloads import HF_HOST, unreachable_because
from cdfsl.data.fingerprint import file_digest
from cdfsl.errors import BackboneError

DEFAULT_CONTEXT_LENGTH = 77
_HF_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model")


def load_tokenizer(name: str, text_cfg: dict[str, Any], folder: str | None = None) -> Callable[..., Tensor]:
    """The tokenizer of backbone `name` (its model config's `text_cfg`): texts → token ids `[K, context]`.

    `folder`: a local Hugging Face tokenizer used instead of the model's own (any model; its ids must fit the text
    tower's vocabulary). Raises `BackboneError` for a missing folder or package, a tokenizer that cannot be had
    offline, or one whose vocabulary is larger than the model's.
    """
    import open_clip

    context = int(text_cfg.get("context_length", DEFAULT_CONTEXT_LENGTH))
    kwargs = dict(text_cfg.get("tokenizer_kwargs", {}))
    hub_name = str(text_cfg.get("hf_tokenizer_name", ""))
    if folder is None and not hub_name:
        return open_clip.tokenizer.SimpleTokenizer(context_length=context, **kwargs)
    if folder is not None:
        source = str(_tokenizer_folder(folder))
    else:
        source = hub_name
        _check_hub_tokenizer(name, hub_name)
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise BackboneError(
            f'{name}\'s tokenizer needs the transformers package: pip install "cdfsl[siglip]"'
        ) from None
    try:
        tokenizer = open_clip.tokenizer.HFTokenizer(
            source, context_length=context, tokenizer_mode=text_cfg.get("tokenizer_mode"), **kwargs
        )
    except (OSError, ValueError) as error:
        raise BackboneError(f"cannot load the tokenizer {source} for {name}: {error}") from None
    vocabulary, model_vocabulary = len(tokenizer.tokenizer), int(text_cfg.get("vocab_size", 0))
    if model_vocabulary and vocabulary > model_vocabulary:
        raise BackboneError(
            f"the tokenizer {source} has {vocabulary} tokens but {name}'s text tower knows {model_vocabulary}; "
            "it is not this model's tokenizer"
        )
    return tokenizer


def _check_hub_tokenizer(name: str, hub_name: str) -> None:
    """Raise at once when the hub tokenizer `hub_name` is neither cached nor downloadable from here."""
    from huggingface_hub import try_to_load_from_cache

    if any(isinstance(try_to_load_from_cache(hub_name, file), str) for file in _HF_FILES):
        return
    why = unreachable_because(HF_HOST)
    if why is None:
        return
    raise BackboneError(
        f"{name}'s tokenizer {hub_name} is not in the local Hugging Face cache and {why}. On a machine with internet: "
        f"python -c \"from transformers import AutoTokenizer; AutoTokenizer.from_pretrained('{hub_name}')"
        ".save_pretrained('TOKENIZER_DIR')\", copy TOKENIZER_DIR here and pass --tokenizer TOKENIZER_DIR"
    )


def tokenizer_identity(folder: str | None) -> str | None:
    """What identifies a `--tokenizer` folder in a run's identity: `sha256:<hex>` over its files' names and contents
    (the same tokenizer copied elsewhere is the same run; an edited one is not); None without a folder."""
    if folder is None:
        return None
    path = _tokenizer_folder(folder)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file()):  # Hugging Face saves a tokenizer as flat files
        digest.update(f"{file.name}\0{file_digest(file)}\n".encode())
    return f"sha256:{digest.hexdigest()}"


def _tokenizer_folder(folder: str) -> Path:
    """`folder` as a path, if it holds a Hugging Face tokenizer; else `BackboneError`."""
    path = Path(folder).expanduser()
    if not path.is_dir() or not any((path / file).is_file() for file in _HF_FILES):
        raise BackboneError(
            f"--tokenizer {folder}: not a folder holding a Hugging Face tokenizer (none of {', '.join(_HF_FILES)})"
        )
    return path
