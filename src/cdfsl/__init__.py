"""cdfsl: source-free cross-domain few-shot learning with vision-language models.

```python
import cdfsl
config = cdfsl.RunConfig(dataset="digits", method="tir", backbone="tiny", shots=1, episodes=5, train={"iterations": 20})
result = cdfsl.run(config)  # progress on stderr when it is a terminal; episodes stored in `config.db`
result.mean_acc, result.ci95, result.per_episode
```

A classifier for one's own images:

```python
clf = cdfsl.FewShotClassifier(method="lora", backbone="ViT-B-16").fit("my_images/train")
clf.predict(["new.jpg"]); clf.save("my_model"); cdfsl.FewShotClassifier.load("my_model")
```

The runner's names (`run`, `Runner`, `RunResult`, `Progress`) and `FewShotClassifier` are imported on first use, so
`import cdfsl` and the command line's help do not load torch and open_clip.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cdfsl.config import RunConfig
from cdfsl.errors import CdfslError
from cdfsl.version import __version__

if TYPE_CHECKING:
    from cdfsl.classifier import FewShotClassifier
    from cdfsl.engine.runner import Progress, Runner, RunResult, run

__all__ = ["CdfslError", "FewShotClassifier", "Progress", "RunConfig", "RunResult", "Runner", "__version__", "run"]

_LAZY = {"Progress", "Runner", "RunResult", "run"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("cdfsl.engine.runner"), name)
    if name == "FewShotClassifier":
        return importlib.import_module("cdfsl.classifier").FewShotClassifier
    raise AttributeError(f"module 'cdfsl' has no attribute {name!r}")
