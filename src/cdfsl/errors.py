"""Errors a user can cause. The CLI prints their message on one line, without a traceback, and exits 2."""


class CdfslError(Exception):
    """Base class: the message says what went wrong and what to do about it."""


class ConfigError(CdfslError):
    """A configuration value is unknown, malformed or out of range."""


class DatasetError(CdfslError):
    """A dataset is missing, malformed, or cannot supply the episodes asked for."""


class BackboneError(CdfslError):
    """A backbone name, pretrained tag or checkpoint cannot be loaded."""


class StoreError(CdfslError):
    """The result store cannot be opened or holds nothing to report."""


class TrainingError(CdfslError):
    """An episode's training or prediction produced a non-finite number (nan or inf): its result would be chance-level
    noise that looks like a measurement, so it is refused instead (the message names the episodes and what to try)."""


class DatasetWarning(UserWarning):
    """A dataset entry was skipped (unreadable image, unsafe or missing file, malformed CSV row)."""


class OutOfMemoryWarning(UserWarning):
    """A batch of episodes ran out of device memory and was split and retried in smaller batches (same results)."""
