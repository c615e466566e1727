"""The replica's typed records: Serve's dict edge converts both ways without loss."""
from __future__ import annotations

import pickle

import pytest
from pydantic import ValidationError

from replicas.protocol import AutoscalingStats, ReplicaInfo, ReplicaStats, RoutingStats


def test_routing_stats_round_trip_serve_dicts():
    s = RoutingStats(waiting=2, running=3, pending_prefill_tokens=40, kv_usage=0.25, epoch="e1")
    assert s.to_serve() == {"waiting": 2, "running": 3, "pending_prefill_tokens": 40, "kv_usage": 0.25,
                            "epoch": "e1"}
    assert RoutingStats.from_serve(s.to_serve()) == s
    assert RoutingStats.from_serve(None) is None and RoutingStats.from_serve({}) is None  # not reported yet
    assert RoutingStats.from_serve({"running": 4}) == RoutingStats(running=4)
    with pytest.raises(ValidationError):
        RoutingStats.from_serve({"wating": 1})  # a misspelt key fails loudly instead of reading as 0


def test_autoscaling_stats_are_floats_for_serve():
    d = AutoscalingStats(waiting=1, running=2, pending_prefill_tokens=3).to_serve()
    assert d == {"waiting": 1.0, "running": 2.0, "pending_prefill_tokens": 3.0}
    assert all(isinstance(v, float) for v in d.values())


def test_replica_records_pickle_as_ray_ships_them():
    info = ReplicaInfo(model_id="m", max_model_len=128, block_size=16, model_path="/m", replica_id="r")
    stats = ReplicaStats(num_waiting=0, num_running=1, pending_prefill_tokens=0, kv_blocks_total=8, kv_blocks_free=7,
                         kv_usage=0.125, prefix_query_tokens=0, prefix_hit_tokens=0, num_preemptions=0,
                         computed_tokens=5, steps=2, last_step_unix=None, replica_id="r", pid=1, tp_size=1,
                         torch_threads=2)
    assert pickle.loads(pickle.dumps(info)) == info and pickle.loads(pickle.dumps(stats)) == stats
    with pytest.raises(ValidationError):
        ReplicaStats(**{**stats.model_dump(), "surprise": 1})
