"""The `zeroshot` base: CLIP's zero-shot classifier (`method.py`); this package imports nothing heavy."""
