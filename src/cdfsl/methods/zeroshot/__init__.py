"""The `zeroshot` base: CLIP's zero-shot classifier (`method.py`), declared in `settings.py` (imported here, so that
it registers); this package imports nothing heavy."""

from cdfsl.methods.zeroshot import settings as settings
