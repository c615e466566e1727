"""Autoscaling, drain and stuck-replica replacement on the real local Ray cluster (tiny model, CPU).

Each test counts every request's outcome: scaling and replacement must not fail one."""
from __future__ import annotations

import asyncio
import os
import re
import time

import pytest

from load_tests.bench_autoscaling import (
    REPLICA,
    LogTail,
    autoscaling_config,
    complete,
    measure_replacement,
    measure_scale_up,
    replica_states,
    running_replicas,
    scaling_decisions,
    tiny_config,
)
from tests.fixtures.wait import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(150)]


def test_burst_scales_up_then_down_after_idle_without_failures(ray_cluster, tiny_model_dir):
    r = measure_scale_up(ray_cluster, str(tiny_model_dir), concurrency=10, target=3,
                         **{"autoscaling.downscale_delay_s": 2})
    assert r["requests_failed"] == 0, r["errors"]
    assert r["requests_ok"] > 10
    ups = [d for d in r["decisions"] if " up " in d]
    downs = [d for d in r["decisions"] if " down " in d]
    # One line per decision, made from the queue figures that caused it.
    assert re.search(r"up 1 -> 3: waiting=\d+ handle_queued=[\d.]+ running=\d+ pending_prefill_tokens=\d+", ups[0])
    assert int(re.search(r"waiting=(\d+)", ups[0]).group(1)) >= 5
    assert downs and downs[-1].split(": ")[0].endswith("-> 1") and "waiting=0" in downs[-1]
    assert len(r["decisions"]) <= 4  # 1->3, then at most 3->2->1 (and no line per tick)


def test_scale_to_zero_then_a_request_waits_for_a_cold_start(serve_app, tiny_model_dir):
    tail = LogTail()
    with serve_app(autoscaling_config(tiny_model_dir, **{
            "autoscaling.min_replicas": 0, "autoscaling.initial_replicas": 1,
            "autoscaling.downscale_delay_s": 5})) as app:
        wait_until(lambda: not replica_states().get("RUNNING") and not replica_states().get("STOPPING"), 60,
                   what=lambda: f"zero replicas (replicas: {replica_states()})")
        assert any("down 1 -> 0" in d for d in scaling_decisions(tail))
        t0 = time.monotonic()
        out = complete(app.base, "scale me up", max_tokens=8, timeout_s=120)  # held at the handle, not failed
        assert out["usage"]["completion_tokens"] == 8
        assert running_replicas() == 1
        assert time.monotonic() - t0 < 120


async def test_downscale_drains_in_flight_streams(ray_cluster, tiny_model_dir):
    """Serve stops a replica only after its streams end; the engine is shut down after that (__del__)."""
    import ray
    from ray import serve

    from cluster.app import replica_options
    from replicas.deployment import LLMReplica
    from replicas.engine.protocol import GenerationRequest, SamplingParams

    app = "drain-test"
    cfg = tiny_config(tiny_model_dir, **{"replicas.num_replicas": 2, "engine.max_num_seqs": 4})

    def run(num_replicas: int):
        # A pinned version makes the second run a pure num_replicas change, as a `serve deploy` config
        # edit is: Serve stops the surplus replica through the same graceful path as an autoscaling downscale.
        opts = {**replica_options(cfg), "num_replicas": num_replicas, "version": "pinned", "_internal": True}
        serve.run(serve.deployment(LLMReplica).options(**opts).bind(cfg.replica_config()), name=app, route_prefix=None)

    await asyncio.to_thread(run, 2)
    try:
        h = serve.get_deployment_handle(REPLICA, app)
        both: set[str] = set()
        for _ in range(40):  # slow both replicas down so their streams outlast the scale-down
            both.add(await h._inject_fault.remote("slow"))
            if len(both) == 2:
                break
        assert len(both) == 2

        async def stream(i: int) -> list[int]:
            req = GenerationRequest(request_id=f"drain-{i}", prompt_token_ids=[5, 6, 7, 8, 9 + i],
                                    sampling=SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))
            tokens: list[int] = []
            async for chunk in h.options(stream=True).generate.remote(req):
                tokens += chunk.token_ids
            return tokens

        streams = [asyncio.create_task(stream(i)) for i in range(6)]
        await asyncio.sleep(1.0)  # all started (60 steps at >= 50 ms each: >= 3 s to go)
        await asyncio.to_thread(run, 1)
        results = await asyncio.wait_for(asyncio.gather(*streams), 60)
        assert [len(t) for t in results] == [60] * 6  # none cut short, none failed

        remaining = (await h.model_info.remote()).replica_id
        (stopped,) = both - {remaining}
        logs = ray._private.worker._global_node.get_logs_dir_path()
        log = open(os.path.join(logs, "serve", f"replica_{app}_{REPLICA}_{stopped}.log")).read()
        waits = [int(n) for n in re.findall(r"Waiting for an additional [\d.]+s to shut down: (\d+) ongoing", log)]
        assert waits and max(waits) > 0  # it really had streams in flight while it drained
    finally:
        serve.delete(app)


def test_stuck_replica_is_replaced_and_no_request_waits_forever(ray_cluster, tiny_model_dir):
    # stall_timeout_s is 2 s in tiny_config: the replica exits once its stall outlasts that.
    r = measure_replacement(ray_cluster, str(tiny_model_dir))
    assert r["requests_failed"] == 0, r["errors"]
    assert r["stall_to_dropped_s"] < 10
    # Requests caught on the stuck replica failed over after the stall bound, not "forever".
    assert r["max_latency_s"] < 20
