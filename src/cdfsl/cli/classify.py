"""A classifier for one's own images: `cdfsl fit`, `predict`, `evaluate` and `export`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from cdfsl.cli.errors import user_errors
from cdfsl.cli.options import (
    DEFAULT_BACKBONE,
    DEFAULT_PRETRAINED,
    BackboneOption,
    IterationsOption,
    PretrainedOption,
    SetOption,
    TokenizerOption,
)
from cdfsl.cli.output import check_output_file, check_output_folder, console, out, plain, shown
from cdfsl.cli.progress import progress_bar
from cdfsl.errors import ConfigError


@user_errors
def fit_command(
    data: Annotated[Path, typer.Option(help="Folder of class folders (an optional classnames.json names them).")],
    output: Annotated[Path, typer.Option("--out", help="Folder for the saved classifier (created).")],
    method: Annotated[str, typer.Option(help="Any method of `cdfsl methods`.")] = "lora",
    backbone: BackboneOption = DEFAULT_BACKBONE,
    pretrained: PretrainedOption = DEFAULT_PRETRAINED,
    tokenizer: TokenizerOption = None,
    recipe: Annotated[str | None, typer.Option(help="Training recipe (default: the method's).")] = None,
    shots: Annotated[
        int | None, typer.Option(help="Use K images per class, drawn by --seed (default: every image).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the drawn shots, the augmented views and training.")] = 0,
    iterations: IterationsOption = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    deterministic: Annotated[
        bool, typer.Option(help="Deterministic GPU kernels and the math attention path (docs/protocol.md).")
    ] = False,
    set_: SetOption = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the classifier already saved in --out (whole, at once).")
    ] = False,
) -> None:
    """Fit a few-shot classifier on your own labelled images and save it (see `cdfsl predict`, `cdfsl evaluate`)."""
    from cdfsl.classifier import FewShotClassifier, check_save_folder
    from cdfsl.files import refuse_overwriting

    check_output_folder(output, "--out")
    check_save_folder(output, overwrite)
    refuse_overwriting(output, "--out", folders=[data])
    if Path(os.path.realpath(data)).is_relative_to(os.path.realpath(output)):
        raise ConfigError(f"--out {output} holds the --data folder {data}; choose another folder for the classifier")
    settings = dict(_assignment(a) for a in set_ or [])
    if iterations is not None:
        settings["train.iterations"] = str(iterations)
    if tokenizer is not None:
        settings["tokenizer"] = str(tokenizer)
    classifier = FewShotClassifier(method, backbone, pretrained, recipe, device, seed, settings)
    bar = progress_bar()
    task: Any = None

    def advance(step: int, steps: int) -> None:
        nonlocal task
        if task is None:  # the bar appears with the first training step: a refusal before it prints alone
            bar.start()
            task = bar.add_task(f"fit {method}", total=steps, accuracy="")
        bar.update(task, completed=step, total=steps)

    from cdfsl.engine.reproducibility import deterministic_mode

    try:
        with deterministic_mode(deterministic):
            classifier.fit(data, shots=shots, on_step=advance)
    finally:
        if task is not None:
            bar.stop()
    classifier.save(output, overwrite=overwrite)
    out.print(f"saved {method} on {len(classifier.classes_)} classes to {output}/", highlight=False)


def _assignment(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {text!r}")
    return key.strip(), value


@user_errors
def predict_command(
    model: Annotated[Path, typer.Argument(help="A classifier saved by `cdfsl fit`.")],
    images: Annotated[list[Path], typer.Argument(help="Image files or folders (every image below them).")],
    top_k: Annotated[int, typer.Option(help="Classes shown per image, most probable first.")] = 1,
    format_: Annotated[
        str | None,
        typer.Option(
            "--format", help="table, csv or json (default: table; with --out, json for a .json file, else csv)."
        ),
    ] = None,
    output: Annotated[Path | None, typer.Option("--out", help="Write the predictions to this file.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
) -> None:
    """Label new images with a saved classifier: the top-k classes and their probabilities. Unreadable images in a
    folder are named in a warning and left out; an unreadable image named on the command line is refused."""
    import numpy as np

    from cdfsl.classifier import FewShotClassifier
    from cdfsl.files import refuse_overwriting, write_text

    if format_ not in (None, "table", "csv", "json"):
        raise ConfigError(f"--format must be table, csv or json, not {format_!r}")
    if top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {top_k}")
    if output is not None:
        if format_ == "table":
            raise ConfigError("--format table is for the terminal; with --out choose --format csv or json")
        format_ = format_ or ("json" if output.suffix.lower() == ".json" else "csv")
        check_output_file(output, "--out")
        refuse_overwriting(output, "--out", folders=[model])
    paths = FewShotClassifier.image_paths(images)
    if output is not None:
        refuse_overwriting(output, "--out", inputs=paths)
    classifier = FewShotClassifier.load(model, device=device)
    probabilities = classifier.predict_proba(paths)
    rows = []
    for path, row in zip(paths, probabilities, strict=True):
        best = np.argsort(-row)[:top_k]
        rows.append({"image": str(path), "top": [(str(classifier.classes_[i]), float(row[i])) for i in best]})
    text = _predictions_text(rows, format_ or "table")
    if output is not None:
        write_text(output, text)
        console.print(f"wrote {len(rows)} predictions to {escape(shown(output))} as {format_}", highlight=False)
    elif format_ in (None, "table"):
        table = Table(title=f"{len(rows)} images", title_justify="left")
        table.add_column("image", overflow="fold")
        table.add_column("class (probability)")
        for row in rows:
            table.add_row(plain(row["image"]), ", ".join(f"{c} ({p:.3f})" for c, p in row["top"]))
        out.print(table)
    else:
        out.print(text, markup=False, highlight=False, soft_wrap=True, end="")


def _predictions_text(rows: list[dict[str, Any]], format_: str) -> str:
    if format_ == "json":
        return json.dumps(rows, indent=2) + "\n"
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "rank", "class", "probability"])
    for row in rows:
        writer.writerows([row["image"], r + 1, c, f"{p:.6f}"] for r, (c, p) in enumerate(row["top"]))
    return buffer.getvalue()


@user_errors
def evaluate_command(
    model: Annotated[Path, typer.Argument(help="A classifier saved by `cdfsl fit`.")],
    data: Annotated[Path, typer.Option(help="Labelled test images: class folders named as at fit time.")],
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the numbers as JSON here.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
) -> None:
    """Accuracy, per-class accuracy and the confusion matrix of a saved classifier on a labelled folder (any of its
    classes, one or more; accuracies in percent)."""
    import numpy as np

    from cdfsl.classifier import FewShotClassifier
    from cdfsl.data.readers import read_imagefolder
    from cdfsl.files import refuse_overwriting, write_text

    if json_path is not None:
        check_output_file(json_path, "--json")
        refuse_overwriting(json_path, "--json", folders=[model])
    index = read_imagefolder(data, min_classes=1)
    assert index.root is not None
    paths = [index.root / key for key in index.items]
    if json_path is not None:
        refuse_overwriting(json_path, "--json", inputs=paths)
    classifier = FewShotClassifier.load(model, device=device)
    known = {str(c): i for i, c in enumerate(classifier.classes_)}
    unknown = [key for key in index.class_keys if key not in known]
    if unknown:
        raise ConfigError(
            f"{data} has class folder(s) {', '.join(unknown)} the classifier was not fitted on; it knows "
            f"{', '.join(known)}"
        )
    truth = np.array([known[index.class_keys[label]] for label in index.labels])
    predicted = classifier.predict_proba(paths).argmax(axis=1)
    k = len(classifier.classes_)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (truth, predicted), 1)
    correct = int(np.trace(confusion))
    per_class = [
        {"class": str(name), "images": int(confusion[i].sum()), "correct": int(confusion[i, i]),
         "accuracy": _percent(int(confusion[i, i]), int(confusion[i].sum()))}
        for i, name in enumerate(classifier.classes_)
    ]  # fmt: skip
    table = Table(title=f"{_percent(correct, len(truth)):.2f}% of {len(truth)} images correct", title_justify="left")
    for column in ("class", "images", "accuracy %", *(str(i + 1) for i in range(k))):
        table.add_column(column, justify="left" if column == "class" else "right", no_wrap=column == "class")
    for i, row in enumerate(per_class):
        share = "–" if row["accuracy"] is None else f"{row['accuracy']:.2f}"
        table.add_row(plain(f"{i + 1} {row['class']}"), str(row["images"]), share, *(str(int(n)) for n in confusion[i]))
    out.print(table)
    if json_path is not None:
        result = {
            "accuracy": _percent(correct, len(truth)), "correct": correct, "images": len(truth),
            "classes": [str(c) for c in classifier.classes_], "per_class": per_class, "confusion": confusion.tolist(),
        }  # fmt: skip
        write_text(json_path, json.dumps(result, indent=2) + "\n")


def _percent(part: int, whole: int) -> float | None:
    """`part` of `whole` in percent (None for no images)."""
    return None if whole == 0 else 100.0 * part / whole


@user_errors
def export_command(
    model: Annotated[Path, typer.Argument(help="A classifier saved by `cdfsl fit`.")],
    merged: Annotated[
        Path,
        typer.Option(
            help="Write the open_clip weights with LoRA merged here (.safetensors), and the class text features "
            "beside it (<stem>.classes.json)."
        ),
    ],
) -> None:
    """Export a saved classifier as plain open_clip weights plus class text features (`open_clip.create_model`
    loads them; the tiny and small test models need `import cdfsl` first)."""
    from cdfsl.classifier import FewShotClassifier
    from cdfsl.files import refuse_overwriting

    sidecar = merged.with_suffix(".classes.json")
    for path in (merged, sidecar):
        check_output_file(path, "--merged")
        refuse_overwriting(path, "--merged", folders=[model])
    weights, sidecar = FewShotClassifier.load(model, device="cpu").export_merged(merged)
    exported = json.loads(sidecar.read_text(encoding="utf-8"))
    name = exported["open_clip_model"]
    out.print(f"wrote {escape(shown(weights))} and {escape(shown(sidecar))}", highlight=False)
    if exported["needs_cdfsl"]:
        out.print(
            f"{name} is an architecture of cdfsl, not of open_clip: open_clip.create_model({name!r}, ...) works only "
            "after `import cdfsl` (exports of open_clip's own models, such as ViT-B-16, load with open_clip alone)",
            highlight=False,
        )
