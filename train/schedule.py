"""How a training phase steps: the learning-rate schedule, the progress bar, the early stop on
SIGUSR1 and the ``--ar-seconds`` step budget."""

from __future__ import annotations

import math
import sys
import time

import torch
from tqdm import tqdm

from hartkit.train.config import TrainConfig


class PhaseStop:
    """``kill -USR1 <pid>`` ends the running phase after the current step (the run goes on to the
    next phase and still writes a checkpoint): a way to fit a busy machine's time budget."""

    requested = False

    @classmethod
    def install(cls) -> None:
        import signal

        if hasattr(signal, "SIGUSR1"):
            signal.signal(signal.SIGUSR1, lambda *_: setattr(cls, "requested", True))

    @classmethod
    def check(cls, log: dict, phase: str, step: int) -> bool:
        if cls.requested:
            cls.requested = False
            log.setdefault("stopped_early", {})[phase] = step + 1
            print(f"\n{phase}: stopped early after {step + 1} steps (SIGUSR1)", file=sys.stderr)
            return True
        return False


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5 % of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def bar(iterable, cfg: TrainConfig, **kwargs):
    return tqdm(iterable, disable=not cfg.progress, file=sys.stderr, dynamic_ncols=True, **kwargs)


class StepBudget:
    """``--ar-seconds``: times the second half of the warm-up and turns the rest of the budget into a
    step count at its end (the warm-up's rate does not depend on the total, so the chosen total fixes
    the whole schedule)."""

    def __init__(self, seconds: float, warmup: int) -> None:
        if warmup < 4:
            raise SystemExit("--ar-seconds needs a warm-up of at least 4 steps (--warmup) to time the steps")
        self.seconds, self.warmup = seconds, warmup
        self.start = time.time()
        self.mark: tuple[int, float] | None = None

    def tick(self, step: int, dev: torch.device) -> None:
        if step == self.warmup // 2:  # the first steps include one-off costs (allocations, kernel loads)
            self.mark = (step, self._now(dev))

    def steps(self, step: int, cap: int, dev: torch.device) -> int:
        """The total step count at ``step`` (end of warm-up), at most ``cap``."""
        assert self.mark is not None
        now = self._now(dev)
        rate = (step - self.mark[0]) / max(now - self.mark[1], 1e-6)
        left = self.seconds - (now - self.start)
        return max(step + 1, min(cap, step + int(left * rate)))

    @staticmethod
    def _now(dev: torch.device) -> float:
        if dev.type == "cuda":  # kernels run asynchronously: time what has finished
            torch.cuda.synchronize(dev)
        return time.time()

