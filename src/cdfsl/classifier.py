"""`FewShotClassifier`: a few-shot classifier for one's own images, in scikit-learn's habits.

It trains what an episode trains, with the same code: the method `cdfsl.methods.build_method` builds, fitted on one
episode (E = 1) whose support set is the user's labelled images (every one of them, each with the recipe's
augmented views), and it classifies new images as that episode's queries (`Method.predict`). Images are read by the
dataset readers' rules (formats allowlist, 16-bit and float images scaled, `docs/protocol.md`), resized as a run
resizes them, and kept in memory.

A saved classifier is a folder: `model.json` (format version, package version, backbone, weights — the pretrained
tag, or the SHA-256 of a local checkpoint, checked again at load —, method, recipe, the resolved config, the classes
and their prompt names) and `trained.safetensors` (what the method trains: LoRA factors, prompt context, MaPLe's
prompts; nothing for zeroshot); with a local tokenizer (`--tokenizer DIR`), a copy of it in `tokenizer/` (its digest
in `model.json`, checked at load), so the folder works where the original tokenizer folder is not. Loading reads JSON
and safetensors only, never pickled code, and checks `model.json`'s fields against each other before building anything.
A folder is written beside its place and renamed into it (`cdfsl.files.replace_folder`); its files get the umask's mode.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cdfsl.config import RunConfig
from cdfsl.errors import ConfigError, DatasetWarning
from cdfsl.files import atomic_output, refuse_overwriting, replace_folder, umask_mode, write_text

if TYPE_CHECKING:
    from cdfsl.data.episodes import EpisodeBatch
    from cdfsl.data.index import ImageIndex
    from cdfsl.engine.context import RunContext
    from cdfsl.methods.base import Method

FORMAT_VERSION = 1
MODEL_FILE, STATE_FILE, TOKENIZER_FOLDER = "model.json", "trained.safetensors", "tokenizer"
PREDICT_CHUNK = 64  # query images encoded at once


class FewShotClassifier:
    """A classifier fitted on a few labelled images per class.

    Args:
        method: any method of `cdfsl methods` (`lora`, `tir`, `coop+lora+vtt`, `maple`, `zeroshot`, ...).
        backbone, pretrained: as `cdfsl run --backbone/--pretrained` (`tiny` is the embedded model).
        recipe: the training recipe (None: the method's default).
        device: `auto`, `cpu`, `cuda`, `cuda:N` or `mps`.
        seed: the seed of the augmented views and every training stream.
        settings: any config field by dotted name (`{"train.iterations": 100}`), as `--set`.

    After `fit`: `classes_` (the labels, sorted) and `class_names_` (their prompt names).
    """

    def __init__(
        self,
        method: str = "lora",
        backbone: str = "ViT-B-16",
        pretrained: str = "openai",
        recipe: str | None = None,
        device: str = "auto",
        seed: int = 0,
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.method, self.backbone, self.pretrained = method, backbone, pretrained
        self.recipe, self.device, self.seed = recipe, device, seed
        self.settings = dict(settings or {})
        self.classes_: list[Any] = []
        self.class_names_: list[str] = []
        self._fitted: tuple[RunContext, Method] | None = None
        self._folder: Path | None = None  # the folder it was saved to or loaded from: never an export's target

    # ------------------------------------------------------------------------------------------------- fitting
    def fit(
        self,
        images: str | Path | Sequence[str | Path],
        labels: Sequence[Any] | None = None,
        class_names: dict[Any, str] | Sequence[str] | None = None,
        shots: int | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> FewShotClassifier:
        """Fit on labelled images: a folder of class folders (`labels` None; an optional `classnames.json` gives
        prompt names), or image paths with one label each. `class_names` maps each label (or gives, in `classes_`
        order) the name put in the prompt; by default the label itself, underscores as spaces. `shots`: use K images
        per class, drawn from each class's images by the seed (the same K images for the same seed and files).
        `on_step(step, steps)` is called after each training step (a progress bar)."""
        from cdfsl.data.classnames import folder_prompt
        from cdfsl.data.readers import read_imagefolder

        if labels is None:
            if not isinstance(images, str | Path) or not Path(images).is_dir():
                raise ConfigError("fit needs a folder of class folders, or image paths with labels")
            index = read_imagefolder(Path(images))
            classes: list[Any] = list(index.class_keys)
            names = list(index.class_names)
        else:
            paths = _paths(images)
            if len(paths) != len(labels):
                raise ConfigError(f"fit got {len(paths)} images but {len(labels)} labels")
            classes = sorted(set(labels), key=str)
            if len(classes) < 2:
                raise ConfigError(f"fit needs at least 2 classes; got {classes}")
            names = [folder_prompt(str(c)) for c in classes]
            index = _path_index(paths, [classes.index(label) for label in labels], [str(c) for c in classes], names)
        if class_names is not None:
            names = _named(classes, class_names)
            index = _renamed(index, names)
        if shots is not None:
            index = _draw_shots(index, shots, self.seed)
        counts = index.counts()
        if min(counts) < 1:
            empty = [str(c) for c, n in zip(classes, counts, strict=True) if n == 0]
            raise ConfigError(f"every class needs at least one readable image; none for {', '.join(empty)}")
        config = self._config(len(classes), min(counts))
        context, method = self._build(config)
        batch = _batch(index, context, context.config, query=None)
        method.on_step = on_step
        method.fit(batch)
        method.on_step = None
        self.classes_, self.class_names_ = classes, names
        self._fitted = (context, method)
        return self

    def _config(self, classes: int, shots: int) -> RunConfig:
        from cdfsl.config import apply_override

        config = RunConfig(
            dataset="imagefolder", data_root=".", method=self.method, recipe=self.recipe, backbone=self.backbone,
            pretrained=self.pretrained, device=self.device, seed=self.seed, ways=classes, shots=shots, queries=1,
        )  # fmt: skip
        for key, value in self.settings.items():
            apply_override(config, f"{key}={_as_text(value)}")
        return config

    @staticmethod
    def _build(config: RunConfig) -> tuple[RunContext, Method]:
        from cdfsl.engine.context import build_context
        from cdfsl.methods import build_method

        context = build_context(config, load_data=False)
        return context, build_method(context.spec, context.backbone, context.autocast_dtype)

    # ---------------------------------------------------------------------------------------------- prediction
    @staticmethod
    def image_paths(images: str | Path | Sequence[str | Path]) -> list[Path]:
        """The images `predict_proba` classifies, in its rows' order: each image file as given, and each folder's
        image files (sorted by path). A file in a folder that cannot be read is named in a `DatasetWarning` and left
        out; an image file given by name that cannot be read, or a missing path, is a `ConfigError`."""
        return _predictable(images)

    def predict_proba(self, images: str | Path | Sequence[str | Path]) -> np.ndarray:
        """Class probabilities `[N, K]` (columns in `classes_` order): the softmax of the method's logits, one row per
        image of `image_paths(images)` (image files, or every readable image in a folder)."""
        context, method = self._require_fitted()
        paths = _predictable(images)
        index = _path_index(paths, [0] * len(paths), ["?"], ["?"], checked=True)
        position = {key: i for i, key in enumerate(index.items)}
        keys = [_key(index.root, p) for p in paths]
        rows = []
        with torch.no_grad():
            for start in range(0, len(keys), PREDICT_CHUNK):
                chunk = [position[k] for k in keys[start : start + PREDICT_CHUNK]]
                batch = _batch(index, context, context.config, query=chunk, class_names=self.class_names_)
                rows.append(torch.softmax(method.predict(batch)[0].float(), dim=-1).cpu().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, len(self.classes_)))

    def predict(self, images: str | Path | Sequence[str | Path]) -> list[Any]:
        """The most probable label of each image (`classes_` entries)."""
        return [self.classes_[int(i)] for i in self.predict_proba(images).argmax(axis=1)]

    def _require_fitted(self) -> tuple[RunContext, Method]:
        if self._fitted is None:
            raise ConfigError("this classifier is not fitted yet: call fit (or FewShotClassifier.load)")
        return self._fitted

    # ------------------------------------------------------------------------------------------ save and load
    def save(self, directory: str | Path, overwrite: bool = False) -> Path:
        """Write `model.json` and `trained.safetensors` into the folder `directory` (created; its parent must exist).

        An existing folder must be empty, or, with `overwrite`, a saved classifier: it is then replaced whole (the
        new folder is written beside it and renamed into place, so an error leaves the old one as it was)."""
        from safetensors.torch import save_file

        from cdfsl.backbone.factory import weights_identity
        from cdfsl.backbone.tokenizers import tokenizer_identity
        from cdfsl.version import __version__

        context, method = self._require_fitted()
        folder = Path(directory)
        check_save_folder(folder, overwrite)
        config = context.config
        meta = {
            "format": FORMAT_VERSION,
            "cdfsl_version": __version__,
            "method": config.method,
            "recipe": config.recipe,
            "backbone": config.backbone,
            "pretrained": config.pretrained,
            "weights": weights_identity(config.pretrained),
            "classes": [_as_json(c) for c in self.classes_],
            "class_names": self.class_names_,
            "template": config.train.template,
            "config": config.to_dict(),
        }
        state = {name: t.detach().cpu().contiguous() for name, t in method.trained_state().items()}

        def fill(staging: Path) -> None:
            if config.tokenizer is not None:
                shutil.copytree(config.tokenizer, staging / TOKENIZER_FOLDER)
                meta["config"]["tokenizer"] = TOKENIZER_FOLDER  # relative to the classifier's folder
                meta["tokenizer"] = tokenizer_identity(str(staging / TOKENIZER_FOLDER))
            save_file(state, str(staging / STATE_FILE))
            os.chmod(staging / STATE_FILE, umask_mode())  # safetensors writes 0600
            (staging / MODEL_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

        replace_folder(folder, fill)
        self._folder = folder
        return folder

    @classmethod
    def load(cls, directory: str | Path, device: str = "auto") -> FewShotClassifier:
        """A saved classifier, ready to predict. Refuses a folder of a newer format, other checkpoint bytes than
        those it was fitted with, or a state that does not fit its method."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from cdfsl.backbone.factory import weights_identity
        from cdfsl.backbone.tokenizers import tokenizer_identity

        folder = Path(directory)
        meta = _read_meta(folder)
        if weights_identity(meta["pretrained"]) != meta["weights"]:
            raise ConfigError(
                f"{folder} was fitted on weights {meta['weights']}, but {meta['pretrained']} now holds other bytes; "
                "restore that checkpoint file"
            )
        config = RunConfig.from_dict(meta["config"], source=str(folder / MODEL_FILE))
        config.device = device
        if config.tokenizer is not None:
            config.tokenizer = str(folder / TOKENIZER_FOLDER)
            if tokenizer_identity(config.tokenizer) != meta.get("tokenizer"):
                raise ConfigError(f"{folder}: its tokenizer/ folder was changed since the classifier was saved")
        classifier = cls(config.method, config.backbone, config.pretrained, config.recipe, device, config.seed)
        context, method = cls._build(config)
        try:
            state = load_file(str(folder / STATE_FILE))
        except (OSError, SafetensorError) as error:
            raise ConfigError(
                f"{folder / STATE_FILE} cannot be read as safetensors ({error}); restore the file or fit again"
            ) from None
        several = sorted(name for name, tensor in state.items() if tensor.ndim == 0 or tensor.shape[0] != 1)
        if several:
            raise ConfigError(
                f"{folder / STATE_FILE}: a saved classifier holds one episode's tensors (leading axis 1), but "
                f"{', '.join(several[:3])} {'has' if len(several) == 1 else 'have'} shape "
                f"{list(state[several[0]].shape)}; restore the file or fit again"
            )
        try:
            method.load_trained_state(state)
        except (ValueError, RuntimeError) as error:
            raise ConfigError(f"{folder}: cannot restore the trained state ({error})") from None
        classifier.classes_ = list(meta["classes"])
        classifier.class_names_ = list(meta["class_names"])
        classifier._fitted = (context, method)
        classifier._folder = folder
        return classifier

    # ------------------------------------------------------------------------------------------------- export
    def export_merged(self, path: str | Path) -> tuple[Path, Path]:
        """Write the backbone's open_clip state dict with every LoRA update merged into its weights (`path`, a
        safetensors file `open_clip.create_model(NAME, pretrained=path)` loads), and beside it `<stem>.classes.json`:
        the open_clip name, whether open_clip knows that name only once cdfsl is imported (`needs_cdfsl`: the tiny
        and small test models), the class labels and prompt names, the logit scale and the class text features
        `[K, C]` as prediction uses them (learned context and text LoRA included). A query's logits are then
        `logit_scale · cos(encode_image(x), text_features)`.

        Refused for what a plain open_clip model cannot reproduce (TIR acting at prediction, MaPLe's prompts), and
        for a path that is an input (the checkpoint) or inside the classifier's folder or the tokenizer's. Both files
        are written whole (a temporary name, then a rename) with the umask's mode.
        """
        from safetensors.torch import save_file

        context, method = self._require_fitted()
        config = context.config
        refusal = method.export_refusal()
        if refusal is not None:
            raise ConfigError(refusal)
        target = Path(path)
        sidecar = target.with_suffix(".classes.json")
        if target.is_dir():
            raise ConfigError(f"{target} is a folder; give a file path for the exported weights")
        if not target.parent.is_dir():
            raise ConfigError(f"the folder {target.parent} does not exist; create it first")
        checkpoint = [config.pretrained] if Path(config.pretrained).is_file() else []
        folders = [p for p in (self._folder, config.tokenizer) if p is not None]
        for written in (target, sidecar):
            refuse_overwriting(written, "the export path", inputs=checkpoint, folders=folders)
        backbone = context.backbone
        model = backbone.model
        names = {id(p): n for n, p in model.named_parameters()}
        state = {n: t.detach().cpu().clone().contiguous() for n, t in model.state_dict().items()}
        for weight, merged in method.weight_updates():
            state[names[id(weight)]] = merged.to(weight.dtype).cpu().contiguous()
        with torch.no_grad():
            text = method.class_features([self.class_names_])[0].float().cpu()  # [K, C]
        scale = float(config.train.logit_scale)
        name = _open_clip_name(config)
        with atomic_output(target) as temporary:
            save_file(state, str(temporary))
        write_text(
            sidecar,
            json.dumps(
                {
                    "open_clip_model": name,
                    "needs_cdfsl": needs_cdfsl(name),
                    "classes": [_as_json(c) for c in self.classes_],
                    "class_names": self.class_names_,
                    "logit_scale": scale,
                    "text_features": text.tolist(),
                },
                indent=1,
            )
            + "\n",
        )
        return target, sidecar


# --------------------------------------------------------------------------------------------------- helpers
def check_save_folder(folder: Path, overwrite: bool) -> None:
    """Refuse a folder `save` could not fill: a file, a missing parent, a non-empty folder (unless `overwrite`, and
    then only a saved classifier: never a folder of other files)."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file, not a folder; choose a folder for the classifier")
    if not folder.parent.is_dir():
        raise ConfigError(f"the folder {folder.parent} does not exist; create it first")
    if not folder.is_dir():
        return
    held = sorted(entry.name for entry in folder.iterdir())
    if not held:
        return
    listed = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
    if not (folder / MODEL_FILE).is_file():
        raise ConfigError(
            f"{folder} holds files ({listed}) and is not a saved classifier; choose a new or empty folder"
        )
    if not overwrite:
        raise ConfigError(
            f"{folder} already holds a saved classifier ({listed}); choose a new folder, or replace it with "
            "--overwrite (Python: save(folder, overwrite=True))"
        )


# model.json's fields, what each holds, and the name of that kind in a message
_META_FIELDS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "method": (str, "a string"),
    "recipe": (str, "a string"),
    "backbone": (str, "a string"),
    "pretrained": (str, "a string"),
    "weights": (str, "a string"),
    "classes": (list, "a list"),
    "class_names": (list, "a list"),
    "config": (dict, "a table"),
}


def _read_meta(folder: Path) -> dict[str, Any]:
    """`model.json` of a saved classifier, its fields checked against their kinds and each other (the classes, their
    prompt names and the configuration's `ways` agree; the top-level method, backbone and weights are the
    configuration's), before anything is built from it."""
    where = folder / MODEL_FILE
    try:
        meta = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"{folder} is not a saved cdfsl classifier ({MODEL_FILE}: {error})") from None
    except RecursionError:
        raise ConfigError(f"{where} is malformed: it nests deeper than JSON can be read; restore the file") from None
    if not isinstance(meta, dict) or "format" not in meta:
        raise ConfigError(f'{folder} is not a saved cdfsl classifier ({MODEL_FILE} has no "format")')

    def malformed(problem: str) -> ConfigError:
        return ConfigError(f"{where} is malformed: {problem}; restore the file or fit the classifier again")

    version = meta["format"]
    if type(version) is not int or version < 1:
        raise malformed(f'"format" must be a whole number such as {FORMAT_VERSION}, not {version!r}')
    if version > FORMAT_VERSION:
        raise ConfigError(
            f"{folder} was saved in classifier format {version}; this cdfsl reads format {FORMAT_VERSION} and "
            "older: upgrade cdfsl"
        )
    for key, (kind, described) in _META_FIELDS.items():
        if key not in meta:
            raise malformed(f'it has no "{key}"')
        if not isinstance(meta[key], kind):
            raise malformed(f'"{key}" must be {described}, not {json.dumps(meta[key])[:60]}')
    classes, names, config = meta["classes"], meta["class_names"], meta["config"]
    if not all(type(c) in (str, int) for c in classes):
        raise malformed('"classes" must list strings or whole numbers')
    if not all(isinstance(n, str) and n for n in names):
        raise malformed('"class_names" must list non-empty strings')
    if len({str(c) for c in classes}) != len(classes) or len(classes) < 2:
        raise malformed(f'"classes" must list at least 2 different classes, not {len(classes)} ({classes[:5]})')
    if len(names) != len(classes):
        raise malformed(f'"classes" has {len(classes)} entries but "class_names" {len(names)}')
    if config.get("ways") != len(classes):
        raise malformed(f'"config.ways" is {config.get("ways")!r} but "classes" has {len(classes)} entries')
    for key in ("method", "recipe", "backbone", "pretrained"):
        if config.get(key) != meta[key]:
            raise malformed(f'"{key}" is {meta[key]!r} but "config.{key}" {config.get(key)!r}')
    if config.get("tokenizer") not in (None, TOKENIZER_FOLDER):
        raise malformed(
            f'"config.tokenizer" must be "{TOKENIZER_FOLDER}" (the copy inside the classifier\'s folder) or null, '
            f"not {config.get('tokenizer')!r}"
        )
    return meta


def needs_cdfsl(open_clip_name: str) -> bool:
    """Whether open_clip knows the architecture `open_clip_name` only once cdfsl registered it (the tiny and small
    test models, whose configs and timm trunks ship with cdfsl); open_clip's own models load without cdfsl."""
    from cdfsl.backbone.small import SMALL_NAMES
    from cdfsl.backbone.tiny import TINY_NAME

    return open_clip_name in (TINY_NAME, *SMALL_NAMES)


def _open_clip_name(config: RunConfig) -> str:
    """The open_clip model name whose architecture and activation the exported weights need."""
    from cdfsl.backbone.factory import QUICKGELU, TINY, resolve_activation
    from cdfsl.backbone.tiny import TINY_NAME

    name = config.backbone
    if name == TINY:
        return TINY_NAME  # open_clip knows it once cdfsl registered its config
    quick = resolve_activation(name, config.pretrained, config.activation) == QUICKGELU
    return f"{name}-quickgelu" if quick and not name.endswith("-quickgelu") else name


def _predictable(images: str | Path | Sequence[str | Path]) -> list[Path]:
    """`FewShotClassifier.image_paths`: given files (each must be readable) and the readable images of given folders
    (the others named in a warning)."""
    from cdfsl.data.readers import image_files

    given = [Path(images)] if isinstance(images, str | Path) else [Path(p) for p in images]
    if not given:
        raise ConfigError("no images given")
    missing = [str(p) for p in given if not p.is_dir() and not p.is_file()]
    if missing:
        raise ConfigError(f"image path(s) not found: {', '.join(missing[:5])}")
    named = [p for p in given if p.is_file()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetWarning)  # named in the error below instead
        unreadable = [str(p) for p, ok in zip(named, _readable(named), strict=True) if not ok]
    if unreadable:
        raise ConfigError(
            f"cannot read the image(s) {', '.join(unreadable[:5])} (not an image of a supported format, or "
            "truncated); leave them out of the command"
        )
    paths: list[Path] = []
    for path in given:
        if path.is_file():
            paths.append(path)
            continue
        found = image_files(path)
        if not found:
            raise ConfigError(f"no image files in {path}")
        readable = [p for p, ok in zip(found, _readable(found), strict=True) if ok]
        if not readable:
            raise ConfigError(f"none of the {len(found)} image files in {path} can be read")
        paths += readable
    return paths


def _readable(paths: list[Path]) -> list[bool]:
    """`readable_images` for paths anywhere (unreadable ones named in one `DatasetWarning`)."""
    from cdfsl.data.readers import readable_images

    if not paths:
        return []
    resolved = [p.resolve() for p in paths]
    root = Path(os.path.commonpath([str(p.parent) for p in resolved]))
    return readable_images(root, [p.relative_to(root).as_posix() for p in resolved])


def _paths(images: str | Path | Sequence[str | Path]) -> list[Path]:
    """Image paths as given, or every image file below a folder (sorted); a missing path is a `ConfigError`."""
    from cdfsl.data.readers import image_files

    if isinstance(images, str | Path):
        given = Path(images)
        if given.is_dir():
            found = image_files(given)
            if not found:
                raise ConfigError(f"no image files in {given}")
            return found
        images = [given]
    paths = [Path(p) for p in images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"image path(s) not found: {', '.join(missing[:5])}")
    if not paths:
        raise ConfigError("no images given")
    return paths


def _key(root: Path | None, path: Path) -> str:
    assert root is not None
    return path.resolve().relative_to(root).as_posix()


def _path_index(
    paths: list[Path], labels: list[int], keys: list[str], names: list[str], checked: bool = False
) -> ImageIndex:
    """An `ImageIndex` of `paths` (root: their common folder) read by the datasets' rules; unreadable files are
    named in a warning and left out (a class left without images is refused by the caller). `checked`: the paths
    are known readable (`_predictable`), not checked again."""
    import functools
    import os

    from cdfsl.data.index import ImageIndex
    from cdfsl.data.readers import open_rgb, readable_images

    resolved = [p.resolve() for p in paths]
    root = Path(os.path.commonpath([str(p.parent) for p in resolved]))
    pairs = sorted({(label, p.relative_to(root).as_posix()) for label, p in zip(labels, resolved, strict=True)})
    if not checked:
        readable = readable_images(root, [key for _, key in pairs])
        pairs = [pair for pair, ok in zip(pairs, readable, strict=True) if ok]
    if not pairs:
        raise ConfigError(f"none of the {len(paths)} images can be read")
    return ImageIndex(
        name="images",
        class_keys=tuple(keys),
        class_names=tuple(names),
        items=tuple(key for _, key in pairs),
        labels=tuple(label for label, _ in pairs),
        loader=functools.partial(open_rgb, root),
        root=root,
    )


def _named(classes: list[Any], class_names: dict[Any, str] | Sequence[str]) -> list[str]:
    if isinstance(class_names, dict):
        missing = [str(c) for c in classes if c not in class_names]
        if missing:
            raise ConfigError(f"class_names has no name for {', '.join(missing)}")
        return [str(class_names[c]) for c in classes]
    if len(class_names) != len(classes):
        raise ConfigError(f"class_names has {len(class_names)} names for {len(classes)} classes")
    return [str(n) for n in class_names]


def _renamed(index: ImageIndex, names: list[str]) -> ImageIndex:
    import dataclasses

    return dataclasses.replace(index, class_names=tuple(names))


def _draw_shots(index: ImageIndex, shots: int, seed: int) -> ImageIndex:
    """`index` with `shots` items per class, drawn by the seed's `fit_shots` stream of each class; a class with
    fewer images is a `ConfigError`."""
    import dataclasses

    from cdfsl.seeding import torch_stream

    if shots < 1:
        raise ConfigError(f"shots must be at least 1, got {shots}")
    kept: list[int] = []
    for label, group in enumerate(index.items_by_class()):
        if len(group) < shots:
            raise ConfigError(f"class {index.class_keys[label]!r} has {len(group)} images, fewer than --shots {shots}")
        order = torch.randperm(len(group), generator=torch_stream(seed, label, "fit_shots"))[:shots]
        kept += sorted(group[int(i)] for i in order)
    return dataclasses.replace(
        index, items=tuple(index.items[i] for i in kept), labels=tuple(index.labels[i] for i in kept)
    )


def _batch(
    index: ImageIndex,
    context: RunContext,
    config: RunConfig,
    query: list[int] | None,
    class_names: Sequence[str] | None = None,
) -> EpisodeBatch:
    """One episode over `index`: every item as support (`query` None; with the recipe's views), or the items at
    positions `query` as its queries (no support)."""
    from cdfsl.data.episodes import build_batch
    from cdfsl.data.images import ImageCache
    from cdfsl.data.index import Episode

    groups = index.items_by_class()
    if query is None:
        episode = Episode(0, tuple(range(len(groups))), tuple(tuple(g) for g in groups), tuple(() for _ in groups))
    else:
        episode = Episode(0, (0,), ((),), (tuple(query),))
    cache = ImageCache(index, context.backbone.image_size, pre_resize=config.pre_resize or 0)
    batch = build_batch(
        [episode], index, cache, config.augment, context.backbone.normalize, config.seed, context.device,
        with_views=query is None and config.trains,
    )  # fmt: skip
    if class_names is not None:
        batch.class_names = [list(class_names)]
    return batch


def _as_text(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return str(value)


def _as_json(value: Any) -> Any:
    return value if isinstance(value, str | int) or (isinstance(value, float) and math.isfinite(value)) else str(value)


__all__ = ["FewShotClassifier", "check_save_folder", "needs_cdfsl"]
