"""Queue-depth autoscaling: replica-reported engine queues -> desired LLMReplica count.

Runs inside the Serve controller every 0.1 s (`AutoscalingPolicy(policy_function=QueueDepthPolicy)`),
so it reads only the latest sample per replica and does a handful of additions. Serve pickles this
module by value: keep it free of project imports at module level.

Signal (summed over running replicas, latest sample of `LLMReplica.record_autoscaling_stats`):
  waiting requests (+ requests queued at handles, e.g. while no replica has a free slot),
  pending prefill tokens, and running sequences against capacity (engine max_num_seqs).
Desired replicas = the most any one signal needs to keep every replica at its target.

Delays are applied here, not by Serve (cluster.app sets Serve's own delays to 0): the policy then
knows the moment a decision is made and logs it once, with the figures that caused it. A downscale
takes the highest count wanted during its delay window, so a short dip never over-shrinks. Like
Serve, it never jumps from >1 straight to 0: 1 -> 0 is its own step after another idle delay.
Scale-from-zero is Serve's cold-start path (requests wait at the handle; it starts a replica at once,
without calling the policy).

Metrics: llmc_autoscaling_desired_replicas (the count returned) and llmc_autoscaling_actual_replicas (running
when deciding), through a recorder created on first use in the controller and touched only when a value changes.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("ray.serve")

POLICY_PATH = "router.autoscaling:QueueDepthPolicy"
_DIR, _SINCE, _PEAK, _DECISIONS = "llmc_direction", "llmc_since", "llmc_peak", "llmc_decisions"
# Serve's per-key series of the replicas' AutoscalingStats (replicas.protocol.AUTOSCALING_KEYS; spelled out here,
# as this module is pickled by value).
STATS_KEYS = ("waiting", "running", "pending_prefill_tokens")


@dataclass(frozen=True)
class QueueFigures:
    waiting: float = 0.0          # in engines' waiting queues
    handle_queued: float = 0.0    # held at handles (no replica could take them)
    running: float = 0.0          # sequences in engines' running batches
    prefill_tokens: float = 0.0   # prompt tokens not yet prefilled
    reporting: int = 0            # replicas with at least one sample

    def describe(self) -> str:
        return (f"waiting={self.waiting:g} handle_queued={self.handle_queued:.1f} running={self.running:g} "
                f"pending_prefill_tokens={self.prefill_tokens:g} replicas_reporting={self.reporting}")


class QueueDepthPolicy:
    def __init__(self, max_num_seqs: int, target_waiting_per_replica: float = 4.0,
                 target_prefill_tokens_per_replica: float = 8192.0, target_running_fraction: float = 0.8,
                 upscale_delay_s: float = 2.0, downscale_delay_s: float = 30.0, name: str = "LLMReplica",
                 metrics=None):
        self.running_target = max(1e-9, max_num_seqs * target_running_fraction)
        self.waiting_target = target_waiting_per_replica
        self.prefill_target = target_prefill_tokens_per_replica
        self.upscale_delay_s = upscale_delay_s
        self.downscale_delay_s = downscale_delay_s
        self.name = name
        # A replicas.metrics.MetricsRecorder (tests pass one); None: created on first use, False: unavailable.
        self._metrics = metrics
        self._recorded: tuple[str, str, int, int] | None = None

    # ------------------------------------------------------------------ signal

    def figures(self, ctx) -> QueueFigures:
        raw = ctx.raw_metrics or {}
        sums = {}
        reporting = set()
        for key in STATS_KEYS:
            total = 0.0
            for replica, series in (raw.get(key) or {}).items():
                if series:
                    total += series[-1].value  # latest sample: react within one push, not a window mean
                    reporting.add(replica)
            sums[key] = total
        queued = ctx.total_queued_requests or 0.0
        return QueueFigures(sums["waiting"], float(queued), sums["running"], sums["pending_prefill_tokens"],
                            len(reporting))

    def desired(self, f: QueueFigures) -> int:
        need = max((f.waiting + f.handle_queued) / self.waiting_target,
                   f.prefill_tokens / self.prefill_target,
                   f.running / self.running_target)
        return math.ceil(need - 1e-9)

    # ------------------------------------------------------------------ decision

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        decision, state = self._decide(ctx)
        self._record(ctx.app_name or "", ctx.deployment_name or self.name, decision, ctx.current_num_replicas)
        return decision, state

    def _decide(self, ctx) -> tuple[int, dict[str, Any]]:
        state = dict(ctx.policy_state or {})
        target = ctx.target_num_replicas
        f = self.figures(ctx)
        if f.reporting == 0 and f.handle_queued == 0:
            # No replica has reported yet (e.g. the first ones are still starting): no evidence either way.
            return target, _clear(state)
        lo, hi = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
        want = min(hi, max(lo, self.desired(f)))
        if want < target and target > 1:
            want = max(1, want)  # 0 only from 1 (Serve enforces the same)
        if want == target:
            return target, _clear(state)

        now = ctx.current_time if ctx.current_time is not None else time.time()
        direction = 1 if want > target else -1
        if state.get(_DIR) != direction:
            state.update({_DIR: direction, _SINCE: now, _PEAK: want})
        # Up: the latest count wanted. Down: the highest count wanted over the window.
        state[_PEAK] = want if direction > 0 else max(state[_PEAK], want)
        delay = self.upscale_delay_s if direction > 0 else self.downscale_delay_s
        if now - state[_SINCE] + 1e-6 < delay:
            return target, state

        decision = state[_PEAK]
        state = _clear(state)
        state[_DECISIONS] = state.get(_DECISIONS, 0) + 1
        log.info("autoscale %s %s %d -> %d: %s desired=%d bounds=[%d,%d] after %.1fs",
                 self.name, "up" if direction > 0 else "down", target, decision, f.describe(),
                 self.desired(f), lo, hi, delay)
        return decision, state

    # ------------------------------------------------------------------ metrics

    def _record(self, application: str, deployment: str, desired: int, actual: int) -> None:
        key = (application, deployment, desired, actual)
        if key == self._recorded:  # the common case, 10 times a second: nothing to do
            return
        self._recorded = key
        if self._metrics is None:
            self._metrics = _recorder()
        if self._metrics:
            labels = {"application": application, "deployment": deployment}
            self._metrics.set("llmc_autoscaling_desired_replicas", desired, **labels)
            self._metrics.set("llmc_autoscaling_actual_replicas", actual, **labels)


def _recorder():
    """The Ray-exported recorder in the controller; False (never retried) where it cannot be made."""
    try:
        import ray
        if not ray.is_initialized():
            return False
        from replicas.metrics import MetricsRecorder  # here, not at module level: Serve pickles this module
        return MetricsRecorder(("llmc_autoscaling_desired_replicas", "llmc_autoscaling_actual_replicas"))
    except Exception as e:  # noqa: BLE001 - no metrics rather than no autoscaling
        log.warning("autoscaling metrics unavailable: %r", e)
        return False


def _clear(state: dict[str, Any]) -> dict[str, Any]:
    for k in (_DIR, _SINCE, _PEAK):
        state.pop(k, None)
    return state
