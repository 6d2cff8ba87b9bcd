"""The `vtt` plug-in: VtT's training extension (`extension.py`) and its fusions (`fusion.py`), declared in
`settings.py` (imported here, so that it registers); this package imports nothing heavy."""

from cdfsl.methods.vtt import settings as settings
