"""The LoRA bases `lora`, `coop` and `coop+lora` (`method.py`); this package imports nothing heavy."""
