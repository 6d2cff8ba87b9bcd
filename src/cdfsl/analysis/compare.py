"""Any two stored runs, episode by episode (`cdfsl compare A B`): two methods, two settings of one method (an
ablation, two templates, DGSO on and off), or two backbones.

A run is named by its id (or a unique prefix of at least 4 hex digits), its run name, or its method when the store
holds one run of that method. Two runs are paired only when
their episodes are the same images: the same dataset content (index fingerprint), ways, shots, queries and seed;
otherwise the comparison is refused, since unpaired accuracies say nothing episode by episode. On the shared
episodes: the mean difference `a − b` in points with its 95% Student's t interval (`t_{0.975, n−1} · s / sqrt(n)`,
s with ddof = 1; `cdfsl.stats.paired_difference`, the same number `report --paired` shows), the two-sided Wilcoxon
signed-rank p-value, and n. Each run's own mean keeps the field's `1.96 · std / sqrt(n)`. Each side also carries its
per-episode records by name (`cdfsl.analysis.records`: VtT's switch-off step, MaPLe's epoch losses), which
`record_lines` words.
"""

from __future__ import annotations

from typing import Any

from cdfsl.analysis.records import RecordSummary, records_dict, summarise_records
from cdfsl.engine.store import ResultStore, RunRecord
from cdfsl.errors import ConfigError, StoreError
from cdfsl.labels import changed_settings, episode_ways, run_label, variant_text, visible
from cdfsl.stats import mean_ci95, paired_difference

PAIRING_KEYS = ("dataset", "index", "ways", "shots", "queries", "seed")


def find_run(runs: list[RunRecord], reference: str) -> RunRecord:
    """The run `reference` names: an exact id, a unique run name, a unique id prefix (at least 4 characters) or the
    method of a single run; otherwise a `ConfigError` listing the runs it could mean (`ambiguous`)."""
    exact = [r for r in runs if r.run_id == reference]
    named = [r for r in runs if r.run_name == reference]
    prefixed = [r for r in runs if len(reference) >= 4 and r.run_id.startswith(reference)]
    by_method = [r for r in runs if r.method == reference]
    for matches in (exact, named, prefixed, by_method):
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise ambiguous(repr(reference), matches)
    raise ConfigError(
        f"no run {reference!r} in the store (a run id, a prefix of 4+ characters, a run name or a method)"
    )


def ambiguous(what: str, matches: list[RunRecord], hint: str = "give a run id") -> ConfigError:
    """The refusal when `what` names several runs: each with its id, its label (method, recipe and the settings
    that differ from the recipe's: what tells the runs apart), its run name, dataset and shots."""
    listed = "; ".join(describe(run) for run in matches[:6]) + ("; …" if len(matches) > 6 else "")
    return ConfigError(f"{what} names {len(matches)} runs: {listed}; {hint}")


def describe(run: RunRecord) -> str:
    """`ID (method / recipe [changed settings], "run name", dataset N-shot)`: one run, told apart from the others."""
    name = f', "{visible(run.run_name)}"' if run.run_name else ""
    return f"{run.run_id} ({label_of(run)}{name}, {run.dataset} {run.shots}-shot)"


def label_of(run: RunRecord) -> str:
    """The run's label: method, recipe, and its `N-way` and changed settings (as report rows show them)."""
    return run_label(run.method, run.recipe, variant_text(episode_ways(run.config), changed_settings(run.config)))


def stored_runs(store: ResultStore, reference: str | None = None) -> list[RunRecord]:
    """Every run of `store`, or the one `reference` names (see `find_run`); a store without runs is a `StoreError`."""
    runs = store.runs()
    if not runs:
        raise StoreError(f"result store {store.path} holds no runs")
    return runs if reference is None else [find_run(runs, reference)]


def compare_runs(store: ResultStore, first: str, second: str) -> dict[str, Any]:
    """Compare runs `first` (a) and `second` (b) of `store` on their shared episodes (module docstring).

    Returns plain numbers: `a`, `b` (run id, name, method, recipe, backbone, episodes, mean and ci95 in percent,
    and `records`: per record name its summary, `RecordSummary.to_dict`), `n`, `only_a`, `only_b`, `mean_diff`,
    `ci95` (Student's t), `p_value` (Wilcoxon).
    """
    runs = stored_runs(store)
    a, b = find_run(runs, first), find_run(runs, second)
    if a.run_id == b.run_id:
        raise ConfigError(f"{first!r} and {second!r} are the same run {a.run_id}")
    ident_a, ident_b = store.run_identity(a.run_id), store.run_identity(b.run_id)
    differing = [key for key in PAIRING_KEYS if ident_a.get(key) != ident_b.get(key)]
    if differing:
        raise ConfigError(
            f"runs {a.run_id} and {b.run_id} are not on the same episodes ({', '.join(differing)} differ): "
            "compare runs of one dataset, episode shape and seed"
        )
    acc_a, acc_b = store.episode_accuracies(a.run_id), store.episode_accuracies(b.run_id)
    paired = paired_difference(acc_a, acc_b)
    if paired.shared == 0:
        raise ConfigError(f"runs {a.run_id} and {b.run_id} share no finished episode")
    return {
        "a": _side(a, acc_a, summarise_records(store.episode_records(a.run_id))),
        "b": _side(b, acc_b, summarise_records(store.episode_records(b.run_id))),
        "n": paired.shared,
        "only_a": paired.only_a,
        "only_b": paired.only_b,
        "mean_diff": paired.mean_diff,
        "ci95": paired.ci95,
        "p_value": paired.p_value,
    }


def record_lines(result: dict[str, Any]) -> list[str]:
    """The records of a `compare_runs` result in words, one line per side and record:
    `A: dlc_off_step: in 3 of 10 episodes, median 12, mean 12.33, range 5–20`."""
    return [
        f"{label.upper()}: {RecordSummary.from_dict(name, summary).text()}"
        for label in ("a", "b")
        for name, summary in result[label]["records"].items()
    ]


def _side(run: RunRecord, accuracies: dict[int, float], records: list[RecordSummary]) -> dict[str, Any]:
    mean, ci = mean_ci95(list(accuracies.values()))
    return {
        "run_id": run.run_id,
        "run_name": run.run_name,
        "label": label_of(run),
        "settings": changed_settings(run.config),
        "method": run.method,
        "recipe": run.recipe,
        "backbone": run.backbone,
        "episodes": len(accuracies),
        "mean": mean,
        "ci95": ci,
        "records": records_dict(records),
    }
