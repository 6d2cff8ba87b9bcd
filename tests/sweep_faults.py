"""Faults for the Ray executor's tests, installed in every Ray worker process (`install`, Ray's
`worker_process_setup_hook`): each chunk a worker trains is logged, and chunks fail as the faults file says.

The faults file (a JSON path in `FAULTS_ENV`, read at every chunk, so each test writes its own):
`{"log": path, "oom_above": {method: n}, "fail": {method: [episodes]}}`: a chunk of more than n episodes of `method`
raises `torch.OutOfMemoryError`; a chunk holding one of the listed episodes raises `RuntimeError`. Logical GPUs:
a worker given a GPU by a Ray started with `num_gpus` on a machine without one trains on the CPU (`cuda` → `cpu`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

FAULTS_ENV = "CDFSL_TEST_SWEEP_FAULTS"


def install() -> None:
    import torch

    import cdfsl.engine.context as context_module
    import cdfsl.engine.runner as runner_module

    original_train = runner_module.train_episodes
    original_device = context_module.resolve_device

    def train_episodes(context: Any, method: Any, episodes: list[int]) -> Any:
        faults = json.loads(Path(os.environ[FAULTS_ENV]).read_text()) if os.environ.get(FAULTS_ENV) else {}
        name = context.config.method
        if "log" in faults:
            with open(faults["log"], "a") as log:
                log.write(json.dumps({"method": name, "pid": os.getpid(), "episodes": episodes}) + "\n")
        if len(episodes) > faults.get("oom_above", {}).get(name, len(episodes)):
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated for {len(episodes)} episodes)")
        if set(episodes) & set(faults.get("fail", {}).get(name, [])):
            raise RuntimeError(f"simulated failure of episodes {episodes}")
        return original_train(context, method, episodes)

    def resolve_device(name: str) -> torch.device:
        return torch.device("cpu") if name.startswith("cuda") else original_device(name)

    runner_module.train_episodes = train_episodes
    context_module.resolve_device = resolve_device
