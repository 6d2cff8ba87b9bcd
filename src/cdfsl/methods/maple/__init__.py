"""The `maple` base: multi-modal prompt learning (`method.py`); this package imports nothing heavy."""
