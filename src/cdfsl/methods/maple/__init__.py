"""The `maple` base: multi-modal prompt learning (`method.py`), declared in `settings.py` (imported here, so that it
registers); this package imports nothing heavy."""

from cdfsl.methods.maple import settings as settings
