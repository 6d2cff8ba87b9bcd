"""cdfsl: source-free cross-domain few-shot learning with vision-language models.

```python
import cdfsl
result = cdfsl.run(cdfsl.RunConfig(dataset="digits", method="tir", backbone="tiny", shots=1, episodes=20))
result.mean_acc, result.ci95, result.per_episode
```
"""

from cdfsl.config import RunConfig
from cdfsl.engine.runner import Progress, Runner, RunResult, run
from cdfsl.errors import CdfslError

__all__ = ["CdfslError", "Progress", "RunConfig", "RunResult", "Runner", "run"]
__version__ = "0.1.0"
