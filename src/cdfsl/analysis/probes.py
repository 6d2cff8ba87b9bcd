"""The diagnostic probes in one place (docs/diagnostics.md): `cdfsl diagnose sink | lost-layers | cka`.

Each probe takes a `RunConfig` (dataset, backbone, episode shape, training recipe), writes `out/<probe>.json` with
every number and PNG figures when `out` is given, and returns that JSON as a dict (`figures` lists the PNG names).
"""

from cdfsl.analysis.cka import MASKS, cka_probe, linear_cka
from cdfsl.analysis.lost_layers import lost_layers_probe
from cdfsl.analysis.sink import sink_probe

__all__ = ["MASKS", "cka_probe", "linear_cka", "lost_layers_probe", "sink_probe"]
