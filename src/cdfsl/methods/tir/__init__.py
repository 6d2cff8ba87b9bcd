"""The `tir` plug-in: token importance recalibration (`recalibration.py`); this package imports nothing heavy."""
