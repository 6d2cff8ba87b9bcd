import pathlib
import sys
from collections.abc import Iterator

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from cdfsl.backbone.adapter import ClipAdapter
from cdfsl.backbone.factory import load_backbone


@pytest.fixture(scope="session", autouse=True)
def private_digest_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pathlib.Path]:
    """File digests go to a folder of the test session, never to the user's cache (subprocesses inherit it)."""
    folder = tmp_path_factory.mktemp("cdfsl-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CDFSL_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch on one intra-op thread for the test: the tiny model's ops are too small to gain from threads, which on a
    busy machine slow them many times over (use with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny() -> ClipAdapter:
    """The tiny architecture with its seeded random weights, built once per test module."""
    return load_backbone("tiny", "none")
