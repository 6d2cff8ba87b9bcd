"""Class prompt names: the one rule that turns a folder (or label) name into the name put in the prompt, and the check
that no two classes of a dataset share a prompt.

Naming (`folder_prompt`): underscores are spaces, and runs of spaces and underscores are one space, with none at either
end (`Corn_(maize)___Common_rust_` → `Corn (maize) Common rust`, `blue_square` → `blue square`). Every entry point that
names classes after folders or labels uses it: the `cropdiseases` and `imagefolder` readers (where `classnames.json`
does not give a name) and the classifier fitted on image paths with labels. Prompt names are part of a dataset's
fingerprint, so they are part of the run identity.

Distinct prompts (`check_distinct_prompts`): two classes whose names read the same to the text tokenizer would get the
same text features, so the model could never tell them apart (their probabilities split evenly). Names are compared as
open_clip's BPE tokenizer (`SimpleTokenizer`, the tokenizer of every CLIP model here except SigLIP's) reads them: text
fixed by `ftfy` (which also brings Unicode to its NFC form, so an NFC and an NFD `café` are one name), HTML entities
unescaped, whitespace collapsed, lower-cased, then cut into the words it encodes one by one (runs of letters, single
digits, runs of other symbols; whitespace is not encoded, so `blue-square` and `blue - square` are one name). Equal
word sequences are exactly equal token ids. SigLIP's tokenizers keep case: for them the check is stricter than needed,
which only refuses classes that differ by case alone.
"""

from __future__ import annotations

import functools
import html
from collections.abc import Sequence
from typing import Any

from cdfsl.errors import DatasetError

_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
"""The pattern open_clip's `SimpleTokenizer` cuts cleaned text with (each match is BPE-encoded on its own)."""


def folder_prompt(name: str) -> str:
    """The prompt name of a class named after a folder or a label: `_` as spaces, runs of separators as one space
    (a name of separators only is kept as it is)."""
    return " ".join(name.replace("_", " ").split()) or name


def tokenizer_words(name: str) -> tuple[str, ...]:
    """`name` as the BPE text tokenizer reads it: the words it encodes (see the module docstring)."""
    import ftfy

    text = ftfy.fix_text(name)
    text = " ".join(html.unescape(html.unescape(text)).split()).lower()
    return tuple(_pattern().findall(text))


def check_distinct_prompts(dataset: str, class_keys: Sequence[str], class_names: Sequence[str]) -> None:
    """Refuse classes that share a prompt name as the text tokenizer reads it (`tokenizer_words`).

    Raises:
        DatasetError: naming every such group of classes (by key and prompt name) and the name they share.
    """
    groups: dict[tuple[str, ...], list[int]] = {}
    for label, name in enumerate(class_names):
        groups.setdefault(tokenizer_words(name), []).append(label)
    shared = [(words, labels) for words, labels in groups.items() if len(labels) > 1]
    if not shared:
        return
    described = "; ".join(
        " and ".join(_describe(class_keys[label], class_names[label]) for label in labels)
        + f" read as {' '.join(words)!r}"
        for words, labels in shared
    )
    raise DatasetError(
        f"{dataset}: classes share a prompt name as the text tokenizer reads it (case, Unicode form and spacing do "
        f"not count), so the model could never tell them apart: {described}; give each class its own name (rename a "
        "folder, or name it in classnames.json or class_names)"
    )


def _describe(key: str, name: str) -> str:
    return repr(key) if key == name else f"{key!r} (prompt {name!r})"


@functools.cache
def _pattern() -> Any:
    import regex

    return regex.compile(_WORDS, regex.IGNORECASE)
