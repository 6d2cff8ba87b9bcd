"""The LoRA bases `lora`, `coop` and `coop+lora` (`method.py`), declared in `settings.py` (imported here, so that they
register); this package imports nothing heavy."""

from cdfsl.methods.lora import settings as settings
