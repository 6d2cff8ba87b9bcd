"""The `tir` plug-in: token importance recalibration (`recalibration.py`), declared in `settings.py` (imported here,
so that it registers); this package imports nothing heavy."""

from cdfsl.methods.tir import settings as settings
