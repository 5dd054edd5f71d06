"""The guards: what to do with a step whose loss or gradients look wrong (DESIGN.md promise 6).

A guard looks at one step's global loss and gradient norm and returns a :class:`GuardDecision`;
it never acts. The training loop acts on the decision: applies the update or not, writes the
decision's line to ``metrics/events.jsonl``, rolls back to the last chunk checkpoint and skips or
reseeds the chunk, or stops. Policies come from ``train.guards``:

* a non-finite loss or gradient norm: ``nonfinite_policy``;
* a loss above ``spike_factor`` x the median of the last ``spike_window`` losses (once at least
  ``min(spike_window, 10)`` are known): ``spike_policy``, where ``record`` trains on and only
  records the spike;
* a step the original run skipped, when a replay follows that run's record: ``skip_step``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from llm360.config import GuardConfig
from llm360.errors import Llm360Error

Policy = Literal["skip_step", "rollback_skip_chunk", "rollback_reseed", "stop"]
ROLLBACKS: frozenset[str] = frozenset({"rollback_skip_chunk", "rollback_reseed"})
REPLAYED_SKIP = "skipped in the original run (replayed)"


class TrainingStopped(Llm360Error):
    """A guard's policy stopped training; the last complete checkpoint is intact."""


@dataclass(frozen=True)
class GuardDecision:
    """What the loop is to do with one step, and the events.jsonl line that records it."""

    policy: Policy | None = None
    """None: apply the update. skip_step: drop it. rollback_*: restore the last chunk checkpoint and
    skip or reseed the chunk. stop: stop training."""
    reason: str = ""
    """Why, for a person (empty when nothing was wrong)."""
    event: str | None = None
    """Kind of the events.jsonl line to write (None: none); the loop adds the step and chunk."""
    fields: Mapping[str, Any] = field(default_factory=dict)
    """That line's other fields (reason, loss, grad_norm, median, ...)."""
    note: str = ""
    """For a stop: why training cannot go on (the policy, or the rollback budget)."""

    @property
    def applies_update(self) -> bool:
        return self.policy is None

    @property
    def rolls_back(self) -> bool:
        return self.policy in ROLLBACKS


TRAIN_ON = GuardDecision()


class StepGuard:
    """The checks of ``train.guards`` for one run; :meth:`check` decides about each step.

    ``recorded_skips``: steps an original run skipped, which a replay of it skips again whatever
    their loss (so the replay applies the same updates).
    """

    def __init__(self, cfg: GuardConfig, *, recorded_skips: Collection[int] = ()) -> None:
        self.cfg = cfg
        self.recorded_skips = frozenset(recorded_skips)

    def check(self, step: int, loss: float, grad_norm: float, loss_window: Sequence[float]) -> GuardDecision:
        """The decision for a step with this global loss and gradient norm (before its update).

        ``loss_window`` holds the losses of the last trained steps (the spike check's median).
        """
        g = self.cfg
        measured = {"loss": loss, "grad_norm": grad_norm}
        if step in self.recorded_skips:
            return _decide("skip_step", REPLAYED_SKIP, measured)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            reason = f"non-finite {'loss' if not math.isfinite(loss) else 'gradient'}"
            return _decide(g.nonfinite_policy, reason, measured)
        if g.spike_factor is not None and len(loss_window) >= min(g.spike_window, 10):
            med = statistics.median(loss_window)
            if loss > g.spike_factor * med:
                reason = f"loss spike: {loss:.4f} > {g.spike_factor} x median {med:.4f}"
                if g.spike_policy == "record":
                    return GuardDecision(None, reason, event="loss_spike", fields={"loss": loss, "median": med})
                return _decide(g.spike_policy, reason, measured)
        return TRAIN_ON

    def within_budget(self, decision: GuardDecision, rollbacks: int) -> GuardDecision:
        """The decision, or a stop when it would roll back after ``max_rollbacks`` rollbacks were made."""
        if not decision.rolls_back or rollbacks < self.cfg.max_rollbacks:
            return decision
        return GuardDecision(
            "stop", decision.reason, event="stop", fields={"reason": f"{decision.reason}; max_rollbacks reached"},
            note=f"{rollbacks} rollbacks were already made (train.guards.max_rollbacks)",
        )


def _decide(policy: Policy, reason: str, measured: Mapping[str, float]) -> GuardDecision:
    """The decision to apply ``policy``. A rollback's line is written once the state is restored, with
    what was restored, so its event fields carry the reason only."""
    if policy in ROLLBACKS:
        return GuardDecision(policy, reason, event=policy, fields={"reason": reason})
    note = "policy is stop" if policy == "stop" else ""
    return GuardDecision(policy, reason, event=policy, fields={"reason": reason, **measured}, note=note)
