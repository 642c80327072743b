"""A tiny job kind for the executor tests (in its own module, so that a worker imports nothing else)."""
import time
from dataclasses import dataclass

from fmnist_core.core.config import Config, param
from fmnist_core.core.errors import RunError
from fmnist_core.core.jobs import job_kind


@dataclass
class FlakyConfig(Config):
    seed: int = param(0, "seed")
    fail: bool = param(False, "raise instead of finishing")
    sleep: float = param(0.0, "seconds to wait first")


@job_kind("flaky", FlakyConfig)
def run_flaky(cfg, out_dir, log=print):
    time.sleep(cfg.sleep)
    if cfg.fail:
        raise RunError(f"job asked to fail (seed {cfg.seed})")
    import torch
    return {"seed": cfg.seed, "square": cfg.seed ** 2, "torch_threads": torch.get_num_threads()}
