"""Listings and checks that train nothing: `cdfsl methods`, `recipes`, `backbones`, `datasets list` and
`datasets check`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from cdfsl.cli.errors import user_errors
from cdfsl.cli.output import ListingFormat, check_listing_format, console, out, plain, print_json, print_listing, shown
from cdfsl.config import DATASETS, METHODS, RunConfig
from cdfsl.errors import ConfigError
from cdfsl.recipes import RECIPES

if TYPE_CHECKING:
    from cdfsl.data.index import ImageIndex


@user_errors
def methods_command(format_: ListingFormat = "table") -> None:
    """Every method name: its base, plug-ins, default recipe and one line on what it does (docs/methods.md)."""
    from cdfsl.registry import BASES, PLUGINS, default_recipe, describe, parse_method

    check_listing_format(format_)
    methods = []
    for name in METHODS:
        recipe = default_recipe(name)
        spec = parse_method(name, recipe)
        methods.append({
            "method": name, "base": spec.base.name, "plugins": [p.name for p in spec.plugins], "recipe": recipe,
            "description": describe(name),
        })  # fmt: skip
    bases = [{"name": base.name, "trains": base.trains, "source": base.source} for base in BASES.values()]
    plugins = [{"name": p.name, "section": p.section, "source": p.source} for p in PLUGINS.values()]
    if format_ == "json":
        print_json({"methods": methods, "bases": bases, "plugins": plugins})
        return
    table = Table(title="methods: a base, then plug-ins joined by + (e.g. coop+lora+tir)", title_justify="left")
    for column in ("method", "base", "plug-ins", "recipe", "what it does"):
        table.add_column(column, no_wrap=column != "what it does")
    for method in methods:
        plugin_names = ", ".join(method["plugins"]) or "–"
        table.add_row(method["method"], method["base"], plugin_names, method["recipe"], method["description"])
    print_listing(table)
    sources = Table(title="sources", title_justify="left")
    for column in ("name", "trains", "source"):
        sources.add_column(column, no_wrap=column == "name")
    for base in bases:
        sources.add_row(base["name"], base["trains"], base["source"])
    for plugin in plugins:
        sources.add_row(plugin["name"], f"plug-in (config section {plugin['section']})", plugin["source"])
    print_listing(sources)


@user_errors
def recipes_command(
    recipe: Annotated[str | None, typer.Option(help=f"Show only this recipe: {', '.join(RECIPES)}.")] = None,
    dataset: Annotated[str, typer.Option(help="Resolve dataset-dependent values for this dataset.")] = "eurosat",
    shots: Annotated[int, typer.Option(help="Resolve shot-dependent values for this many shots.")] = 5,
    format_: ListingFormat = "table",
) -> None:
    """Every recipe's values with the source of each (paper section or release file); docs/recipes.md explains."""
    from cdfsl.registry import BASES, DEFAULT_BASE, RECIPE_BASE, default_recipe

    check_listing_format(format_)
    if recipe is not None and recipe not in RECIPES:
        raise ConfigError(f"--recipe must be one of {', '.join(RECIPES)}; got {recipe!r}")
    if dataset not in DATASETS:
        raise ConfigError(f"--dataset must be one of {', '.join(DATASETS)}; got {dataset!r}")
    listed = []
    for spec in RECIPES.values():
        if recipe is not None and spec.name != recipe:
            continue
        defaults = [m for m in METHODS if default_recipe(m) == spec.name]
        # the base a plug-in alone (`tir`, `vtt`) runs on under this recipe: the values a base decides (`lora` has no
        # learned context) would otherwise hide the recipe's own (tir-release's context on its coop+lora base)
        base = BASES[RECIPE_BASE.get(spec.name, DEFAULT_BASE)].name
        example = RunConfig(dataset=dataset, data_root=".", shots=shots, method=base, recipe=spec.name).resolved()
        values = []
        for value in spec.values:
            section, _, name = value.key.rpartition(".")
            resolved = getattr(getattr(example, section) if section else example, name)
            values.append({"key": value.key, "value": resolved, "rule": value.rule, "source": value.source})
        listed.append({
            "name": spec.name, "summary": spec.summary, "default_for": defaults, "base": base, "dataset": dataset,
            "shots": shots, "values": values,
        })  # fmt: skip
        if format_ == "json":
            continue
        table = Table(
            title=f"{spec.name}: {spec.summary}\n(default for: {', '.join(defaults) or 'no method'}; values on the "
            f"{base} base)",
            title_justify="left",
        )
        table.add_column("key", no_wrap=True)
        table.add_column(f"value ({dataset}, {shots}-shot, {base} base)")
        table.add_column("source")
        for item in values:
            resolved = item["value"]
            text = ",".join(map(str, resolved)) if isinstance(resolved, tuple) else repr(resolved)
            table.add_row(item["key"], f"{text} ({item['rule']})" if item["rule"] else text, item["source"])
        print_listing(table)
    if format_ == "json":
        print_json(listed)


@user_errors
def backbones_command(
    all_: Annotated[bool, typer.Option("--all", help="Also list the models cdfsl cannot run yet, with why.")] = False,
    format_: ListingFormat = "table",
) -> None:
    """The open_clip models cdfsl runs (every method; the diagnostics each supports), their towers and weights."""
    import dataclasses

    from cdfsl.backbone.catalog import catalogue
    from cdfsl.registry import method_names

    check_listing_format(format_)
    entries = catalogue()
    supported = [e for e in entries if e.supported]
    if format_ == "json":
        print_json([dataclasses.asdict(e) for e in (entries if all_ else supported)])
        return
    table = Table(
        title=f"{len(supported)} of {len(entries)} open_clip models run in cdfsl, each with all "
        f"{len(method_names())} methods (`cdfsl methods`)",
        title_justify="left",
    )
    for column in ("name", "family", "vision", "text", "C", "VtT release fusion", "diagnostics", "pretrained tags"):
        table.add_column(column, no_wrap=column in ("name", "family"))
    for entry in supported:
        fusion = "yes" if entry.vtt_release_fusion else "no: ssm"
        row = [
            entry.name, entry.family, entry.vision, entry.text, str(entry.embed_dim), fusion,
            ", ".join(entry.diagnostics), ", ".join(entry.tags) or "–",
        ]  # fmt: skip
        table.add_row(*row)
    print_listing(table)
    if not all(entry.vtt_release_fusion for entry in supported):
        out.print("VtT on a model without the release fusion: --set vtt.fusion=ssm", highlight=False)
    others = [e for e in entries if not e.supported]
    if all_:
        rest = Table(title="not supported yet", title_justify="left")
        rest.add_column("name", no_wrap=True)
        rest.add_column("why")
        for entry in others:
            rest.add_row(entry.name, entry.reason)
        print_listing(rest)
    else:
        out.print(f"{len(others)} more (ResNets, ConvNeXt and EVA trunks, Hugging Face text towers): --all")


datasets_app = typer.Typer(help="List the benchmarks and inspect dataset layouts.")


@datasets_app.callback(invoke_without_command=True)
def datasets_main(
    context: typer.Context,
    json_: Annotated[bool, typer.Option("--json", help="Print the listing as JSON (as --format json).")] = False,
    format_: ListingFormat = "table",
) -> None:
    """`cdfsl datasets` alone lists every benchmark (as `cdfsl datasets list`)."""
    if context.invoked_subcommand is None:
        datasets_list(json_=json_, format_=format_)


@datasets_app.command("list")
@user_errors
def datasets_list(
    json_: Annotated[bool, typer.Option("--json", help="Print the listing as JSON (as --format json).")] = False,
    format_: ListingFormat = "table",
) -> None:
    """Every benchmark `--dataset` takes: its suite, reader, what it needs on disk, default protocol and templates
    (docs/benchmarks.md)."""
    from cdfsl.data.benchmarks import COOP_TEMPLATE
    from cdfsl.data.benchmarks import DATASETS as BENCHMARKS
    from cdfsl.data.readers import READERS

    check_listing_format(format_)
    listed = []
    for benchmark in BENCHMARKS.values():
        shots = benchmark.shots
        listed.append({
            "name": benchmark.name, "suite": benchmark.suite, "reader": benchmark.reader,
            "needs_root": benchmark.needs_root, "layout": READERS[benchmark.reader].layout,
            "class_names": benchmark.class_names, "protocol": benchmark.protocol,
            "episodic_split": benchmark.episodic_split, "ways": benchmark.ways, "shots": shots,
            "queries": benchmark.queries, "episodes": benchmark.episodes_for(shots), "template": benchmark.template,
            "coop_template": benchmark.coop_template,
        })  # fmt: skip
    if json_ or format_ == "json":
        print_json(listed)
        return
    table = Table(
        title=f"{len(listed)} benchmarks (--dataset); --set train.template={COOP_TEMPLATE} takes the CoOp template",
        title_justify="left",
    )
    for column in ("name", "suite", "reader", "needs on disk (--data-root)", "protocol", "template", "CoOp template"):
        table.add_column(column, no_wrap=column in ("name", "suite", "reader"))
    for entry in listed:
        split = f", {entry['episodic_split']} split" if entry["episodic_split"] else ""
        protocol = f"{entry['protocol']}: {entry['ways']}-way {entry['shots']}-shot {entry['queries']}q{split}"
        table.add_row(
            entry["name"], entry["suite"] or "–", entry["reader"],
            plain(entry["layout"] if entry["needs_root"] else "nothing: " + entry["layout"]),
            protocol, plain(entry["template"]), plain(entry["coop_template"] or "–"),
        )  # fmt: skip
    print_listing(table)


@datasets_app.command("check")
@user_errors
def datasets_check(
    dataset: Annotated[str, typer.Option(help=f"One of: {', '.join(DATASETS)}.")],
    data_root: Annotated[Path | None, typer.Option(help="Dataset folder (not needed for digits).")] = None,
    deep: Annotated[
        bool,
        typer.Option(
            "--deep",
            help="Also decode every image and list those that do not decode (truncated, corrupt), so a run never "
            "stops half-way on one. Exits 1 when any image does not decode (their count is printed), for scripts.",
        ),
    ] = False,
) -> None:
    """Validate a dataset layout and print its classes, prompt names and image counts (per split where the source
    publishes splits)."""
    from cdfsl.data.benchmarks import DATASETS as BENCHMARKS

    if dataset not in DATASETS:
        raise ConfigError(f"--dataset must be one of {', '.join(DATASETS)}; got {dataset!r}")
    benchmark = BENCHMARKS[dataset]
    index = benchmark.read_splits(data_root)
    splits = [name for name in ("train", "val", "test") if name in index.split_names]
    table = Table(title=f"{dataset}: {len(index.items)} images, {index.num_classes} classes")
    table.add_column("label", justify="right")
    table.add_column("class")
    table.add_column("prompt name")
    for split in splits:
        table.add_column(split, justify="right")
    table.add_column("images", justify="right")
    per_split = [index.split(split).counts() for split in splits]
    for label, (key, name, count) in enumerate(zip(index.class_keys, index.class_names, index.counts(), strict=True)):
        table.add_row(str(label), plain(key), plain(name), *(str(counts[label]) for counts in per_split), str(count))
    out.print(table)
    if index.skipped:
        out.print(f"{len(index.skipped)} files skipped (unreadable or outside the data root)")
    if benchmark.episodic_split is None:
        out.print(f"fingerprint {index.fingerprint()}")
    else:  # what a run's identity holds: the split its episodes are drawn from
        episodic = index.split(benchmark.episodic_split)
        out.print(f"fingerprint {episodic.fingerprint()} (the {benchmark.episodic_split} split, which episodes use)")
    if deep and deep_check_report(index):
        raise typer.Exit(1)


def deep_check_report(index: ImageIndex) -> int:
    """Decode every image of `index`; print the ones that fail (key, reason) and which files to remove. Returns how
    many fail."""
    from cdfsl.data.readers import deep_check

    total = len(index.items)
    with console.status(f"decoding {total} images …"):
        failures = deep_check(index)
    if not failures:
        out.print(f"deep check: all {total} images decode")
        return 0
    table = Table(title=f"deep check: {len(failures)} of {total} images do not decode", title_justify="left")
    table.add_column("key", overflow="fold")
    table.add_column("reason")
    for key, reason in failures:
        table.add_row(plain(key), plain(reason))
    out.print(table)
    where = f" (keys are relative to {shown(index.root)})" if index.root is not None else ""
    message = (
        f"{len(failures)} of {total} images failed to decode: remove (or replace) the files listed above{where}, "
        "then run `cdfsl datasets check --deep` again"
    )
    out.print(plain(message), soft_wrap=True)
    return len(failures)
