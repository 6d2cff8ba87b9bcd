"""The `vtt` plug-in: VtT's training extension (`extension.py`) and its fusions (`fusion.py`); this package imports
nothing heavy."""
