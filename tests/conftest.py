import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from cdfsl.backbone.adapter import ClipAdapter
from cdfsl.backbone.factory import load_backbone


@pytest.fixture(scope="module")
def tiny() -> ClipAdapter:
    """The tiny architecture with its seeded random weights, built once per test module."""
    return load_backbone("tiny", "none")
