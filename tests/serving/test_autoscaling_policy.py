"""QueueDepthPolicy on synthetic Serve contexts: signal -> count, bounds, delays, decision log."""
from __future__ import annotations

import logging

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID, TimeStampedValue
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from cluster.app import policy_config
from cluster.config import load_config
from router.autoscaling import QueueDepthPolicy

DEP = DeploymentID(name="LLMReplica", app_name="llm-cluster")


def ctx(replicas: list[dict], target: int, *, lo: int = 1, hi: int = 8, now: float = 100.0, state=None,
        handle_queued: float = 0.0, current: int | None = None) -> AutoscalingContext:
    """replicas: one {metric: latest value} per running replica (older samples precede it)."""
    ids = [ReplicaID(f"r{i}", DEP) for i in range(len(replicas))]
    raw: dict = {}
    for rid, metrics in zip(ids, replicas):
        for name, value in metrics.items():
            # An older, very different sample first: the policy must read the latest one.
            raw.setdefault(name, {})[rid] = [TimeStampedValue(now - 1.0, 999.0), TimeStampedValue(now - 0.1, value)]
    return AutoscalingContext(
        deployment_id=DEP, deployment_name=DEP.name, app_name=DEP.app_name,
        current_num_replicas=len(ids) if current is None else current, target_num_replicas=target,
        running_replicas=ids, total_num_requests=0.0, total_queued_requests=handle_queued,
        aggregated_metrics=None, raw_metrics=raw, capacity_adjusted_min_replicas=lo,
        capacity_adjusted_max_replicas=hi, policy_state=state or {}, last_scale_up_time=None,
        last_scale_down_time=None, current_time=now, config=None)


def q(waiting=0, running=0, prefill=0) -> dict:
    return {"waiting": waiting, "running": running, "pending_prefill_tokens": prefill}


def policy(**kw) -> QueueDepthPolicy:
    args = dict(max_num_seqs=4, target_waiting_per_replica=4, target_prefill_tokens_per_replica=1000,
                target_running_fraction=0.5, upscale_delay_s=0.0, downscale_delay_s=10.0)
    args.update(kw)
    return QueueDepthPolicy(**args)


@pytest.fixture
def decisions():
    """Records the decision lines the policy logs on Serve's logger (which does not propagate)."""
    records: list[str] = []

    class H(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    h = H(level=logging.INFO)
    logger = logging.getLogger("ray.serve")
    logger.addHandler(h)
    yield records
    logger.removeHandler(h)


def test_each_signal_drives_the_count():
    p = policy()
    assert p(ctx([q(waiting=12, running=2)], 1))[0] == 3          # 12 waiting / 4 per replica
    assert p(ctx([q(prefill=2500)], 1))[0] == 3                    # 2500 tokens / 1000 per replica
    assert p(ctx([q(running=4), q(running=4)], 2))[0] == 4         # 8 running / (4 seqs * 0.5)
    assert p(ctx([q(waiting=1)], 1, handle_queued=7))[0] == 2      # handle-queued count as waiting
    assert p(ctx([q(waiting=4, running=2)], 1))[0] == 1            # exactly at target: hold


def test_upscale_and_max_clamp(decisions):
    p = policy()
    n, state = p(ctx([q(waiting=100, running=2)], 1, hi=5))
    assert n == 5
    assert len(decisions) == 1
    line = decisions[0]
    assert "up 1 -> 5" in line and "waiting=100" in line and "running=2" in line and "desired=25" in line


def test_upscale_delay_then_latest_count(decisions):
    p = policy(upscale_delay_s=2.0)
    n, s = p(ctx([q(waiting=12)], 1, now=100.0))
    assert n == 1 and not decisions                            # wanted, not yet decided
    n, s = p(ctx([q(waiting=8)], 1, now=101.0, state=s))
    assert n == 1
    n, s = p(ctx([q(waiting=8)], 1, now=102.0, state=s))
    assert n == 2 and len(decisions) == 1                      # latest wish after the delay
    n, s = p(ctx([q(waiting=8)], 2, now=102.1, state=s))
    assert n == 2 and len(decisions) == 1                      # no line on a steady tick


def test_upscale_wish_that_goes_away_resets_the_delay():
    p = policy(upscale_delay_s=2.0)
    _, s = p(ctx([q(waiting=12)], 1, now=100.0))
    _, s = p(ctx([q(waiting=0)], 1, now=101.0, state=s))       # back at target: pending wish dropped
    n, s = p(ctx([q(waiting=12)], 1, now=102.5, state=s))
    assert n == 1                                               # delay restarts from 102.5
    n, _ = p(ctx([q(waiting=12)], 1, now=104.5, state=s))
    assert n == 3


def test_downscale_waits_and_keeps_the_window_peak(decisions):
    p = policy(downscale_delay_s=10.0)
    four = [q(running=1)] * 4
    n, s = p(ctx(four, 4, now=100.0))                           # 4 running -> wants 2
    assert n == 4
    n, s = p(ctx([q(running=2), q(running=2), q(running=1), q()], 4, now=105.0, state=s))  # wants 3
    assert n == 4
    n, s = p(ctx(four, 4, now=110.0, state=s))
    assert n == 3 and len(decisions) == 1                       # the peak of the window, not the last wish
    assert "down 4 -> 3" in decisions[0]


def test_min_replicas_and_scale_to_zero_from_one_only():
    p = policy(downscale_delay_s=5.0)
    idle3 = [q(), q(), q()]
    n, s = p(ctx(idle3, 3, lo=0, now=0.0))
    n, s = p(ctx(idle3, 3, lo=0, now=5.0, state=s))
    assert n == 1                                               # never >1 straight to 0
    n, s = p(ctx([q()], 1, lo=0, now=5.1, state=s))
    assert n == 1
    n, s = p(ctx([q()], 1, lo=0, now=10.1, state=s))
    assert n == 0                                               # 1 -> 0 after its own idle delay
    n, _ = p(ctx([q()], 2, lo=2, now=0.0))
    assert n == 2                                               # min_replicas floor


def test_no_reports_yet_holds_the_target():
    p = policy(downscale_delay_s=0.0)
    assert p(ctx([], 3, lo=0, current=3))[0] == 3
    # The first replica still starting (none running): not scaled away before it ever served.
    assert p(ctx([], 1, lo=0, current=0))[0] == 1
    # Scaled to zero with nothing queued anywhere: stays at zero.
    assert p(ctx([], 0, lo=0, current=0))[0] == 0


def test_policy_config_builds_a_serve_autoscaling_config():
    cfg = load_config(overrides=["autoscaling.enabled=true", "autoscaling.min_replicas=0",
                                 "engine.max_num_seqs=8", "autoscaling.upscale_delay_s=1.5"])
    pc = policy_config(cfg)
    ac = AutoscalingConfig(min_replicas=0, max_replicas=4, policy=pc)
    built = ac.policy.get_policy()(**ac.policy.policy_kwargs)   # what the controller does
    assert isinstance(built, QueueDepthPolicy)
    assert built.upscale_delay_s == 1.5 and built.running_target == 8 * cfg.autoscaling.target_running_fraction

    from cluster.app import autoscaling_config
    out = autoscaling_config(cfg)
    # Delays live in the policy; Serve's must not hold its decisions back again.
    assert out["policy"] == pc and out["upscale_delay_s"] == 0 and out["downscale_delay_s"] == 0


def test_policy_reads_the_fields_replicas_report():
    from replicas.protocol import AUTOSCALING_KEYS
    from router.autoscaling import STATS_KEYS

    assert STATS_KEYS == AUTOSCALING_KEYS
