"""Fault injection, to exercise the guards in tests: NaNs and loss spikes at chosen steps.

Set :data:`INJECT_ENV` to comma-separated global steps: ``7`` makes step 7's loss and one gradient
NaN, ``7:x20`` multiplies its loss and every gradient by 20 (a loss spike). Each step is hit once
per process, so the step runs clean when a rollback trains it again. The trainer calls
:meth:`FaultInjector.after_backward` once per step, after the backward passes and before the loss
is reduced over ranks; with the variable unset that call does nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from llm360.errors import ConfigError

INJECT_ENV = "LLM360_INJECT_AT_STEPS"
"""Test hook to exercise the guards: comma-separated global steps whose loss and gradients are made NaN
(``7``) or multiplied by a factor (``7:x20``, a loss spike), once each."""


def parse_injections(spec: str) -> dict[int, float | None]:
    """``"4,9:x20"`` -> {4: None (NaN), 9: 20.0 (loss times 20)}; see :data:`INJECT_ENV`.

    Raises ConfigError for an item that is not STEP or STEP:xFACTOR.
    """
    out: dict[int, float | None] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        step, _, factor = item.partition(":x")
        try:
            out[int(step)] = float(factor) if factor else None
        except ValueError:
            raise ConfigError(f"{INJECT_ENV}={spec!r}: {item!r} is not STEP or STEP:xFACTOR") from None
    return out


class FaultInjector:
    """Corrupts the loss and gradients of chosen steps, once each; see the module docstring."""

    def __init__(self, at_steps: Mapping[int, float | None] | None = None) -> None:
        self.at_steps = dict(at_steps or {})
        """step -> None (NaN) or the factor of a loss spike."""
        self.done: set[int] = set()

    @classmethod
    def from_env(cls) -> FaultInjector:
        """The injections :data:`INJECT_ENV` asks for (none when it is unset)."""
        return cls(parse_injections(os.environ.get(INJECT_ENV, "")))

    def after_backward(self, step: int, loss_sum: torch.Tensor, model: nn.Module) -> None:
        """Corrupt this rank's summed loss (in place) and ``model``'s gradients if ``step`` is due."""
        if step not in self.at_steps or step in self.done:
            return
        self.done.add(step)
        factor = self.at_steps[step]
        if factor is None:  # NaN: one gradient is enough for the non-finite check
            loss_sum.fill_(float("nan"))
            next(p for p in model.parameters() if p.grad is not None).grad.fill_(float("nan"))
        else:  # a loss spike: loss and gradients scaled alike
            loss_sum.mul_(factor)
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(factor)
