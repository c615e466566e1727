"""Who records what, without a Ray cluster: the replica's periodic engine-stats export and the KV publisher's
Redis fallbacks (ReplicaMetrics, LLMReplica), the autoscaling policy's gauges, and the router's x-replica-id
header through retries and failover (fake replicas)."""
from __future__ import annotations

import asyncio
import socket

import pytest
from prometheus_client import CollectorRegistry

from cluster.ports import free_port
from kvstore.index import RedisPrefixIndex
from kvstore.publisher import KVEventPublisher
from replicas.metrics import MetricsRecorder, ReplicaMetrics
from tests.fixtures.configs import cluster_config
from tests.fixtures.fake_replicas import FakeReplica, ReplicaDied, sse_events
from tests.fixtures.wait import wait_until_async
from tests.serving.test_autoscaling_policy import ctx, policy, q

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13]
R = {"model": "m", "replica": "r1"}


def _stats(**kw):
    base = dict(num_waiting=0, num_running=0, pending_prefill_tokens=0, kv_usage=0.0, prefix_query_tokens=0,
                prefix_hit_tokens=0, num_preemptions=0)
    return {**base, **kw}


# ---------------------------------------------------------------- replica


async def test_replica_metrics_samples_engine_stats_periodically_until_stopped():
    reg = CollectorRegistry()
    samples = [_stats(num_waiting=2, num_running=1, kv_usage=0.25, prefix_query_tokens=64, prefix_hit_tokens=32)]
    calls = []

    def stats():
        calls.append(1)
        return samples[-1]

    m = ReplicaMetrics("m", "r1", stats, period_s=0.02, ray=False, registry=reg)
    m.start()
    v = reg.get_sample_value
    await wait_until_async(lambda: v("llmc_kv_cache_usage_ratio", R) == 0.25, 5, 0.01)
    assert v("llmc_num_requests_waiting", R) == 2 and v("llmc_num_requests_running", R) == 1
    assert v("llmc_prefix_cache_hit_tokens_total", R) == 32
    samples.append(_stats(prefix_query_tokens=96, prefix_hit_tokens=48))  # a later sample: deltas added
    await wait_until_async(lambda: v("llmc_prefix_cache_hit_tokens_total", R) == 48, 5, 0.01)
    assert v("llmc_kv_cache_usage_ratio", R) == 0.0
    m.stop()
    await asyncio.sleep(0.05)
    n = len(calls)
    await asyncio.sleep(0.1)
    assert len(calls) == n and not m.running  # stopped: no more engine reads


async def test_replica_metrics_survives_a_failing_stats_read():
    reg = CollectorRegistry()
    fail = [True]

    def stats():
        if fail[0]:
            raise RuntimeError("engine gone")
        return _stats(num_running=3)

    m = ReplicaMetrics("m", "r1", stats, period_s=0.02, ray=False, registry=reg)
    m.start()
    await asyncio.sleep(0.06)
    assert m.running
    fail[0] = False
    await wait_until_async(lambda: reg.get_sample_value("llmc_num_requests_running", R) == 3, 5, 0.01)
    m.stop()


async def test_publisher_counts_redis_failures_by_reason():
    """A refused connection is an "error"; a server that accepts but never answers is a "timeout"."""
    reg = CollectorRegistry()
    m = ReplicaMetrics("m", "r1", _stats, ray=False, registry=reg)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections complete in the backlog; nothing ever replies
    pubs = []
    try:
        for url in (f"redis://127.0.0.1:{free_port()}", f"redis://127.0.0.1:{silent.getsockname()[1]}"):
            index = RedisPrefixIndex(url, write_timeout_s=0.1)
            pub = KVEventPublisher(index, "m", "r1", "e1", retry_s=0.02, on_fallback=m.redis_fallback)
            await pub.start()
            pubs.append(pub)
        v = reg.get_sample_value
        await wait_until_async(
            lambda: (v("llmc_redis_fallbacks_total", {"component": "publisher", "reason": "error"}) or 0) >= 2
            and (v("llmc_redis_fallbacks_total", {"component": "publisher", "reason": "timeout"}) or 0) >= 2, 5, 0.01)
        total = sum(v("llmc_redis_fallbacks_total", {"component": "publisher", "reason": r})
                    for r in ("error", "timeout"))
        assert total <= sum(p.errors for p in pubs) + 2  # one per operation given up (stop's drop may add one each)
    finally:
        for pub in pubs:
            await pub.stop()
            await pub.index.close()
        silent.close()


async def test_llm_replica_exports_its_stats_and_publisher_fallbacks(tiny_model_dir, monkeypatch):
    """LLMReplica wires both: the sampling task starts on its loop and stops on shutdown; its publisher
    reports to the same ReplicaMetrics."""
    import replicas.deployment as rm
    from replicas.deployment import LLMReplica
    from replicas.engine.protocol import GenerationRequest, SamplingParams

    reg = CollectorRegistry()
    real = rm.ReplicaMetrics

    def with_registry(*a, **kw):  # the replica's own ReplicaMetrics, also recording where the test can read
        return real(*a, **{**kw, "registry": reg, "period_s": 0.05})
    monkeypatch.setattr(rm, "ReplicaMetrics", with_registry)
    cfg = cluster_config(tiny_model_dir, {"engine.model_id": "tiny", "engine.block_size": 4, "engine.num_kv_blocks": 64,
                                          "redis_url": f"redis://127.0.0.1:{free_port()}"})  # nothing listens there
    replica = LLMReplica(cfg.replica_config())
    try:
        labels = {"model": "tiny", "replica": replica.replica_id}
        req = GenerationRequest(request_id="a", prompt_token_ids=list(range(10, 23)),
                                sampling=SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
        for rid in ("a", "b"):  # the same prompt twice: the second finds its 3 full blocks cached
            chunks = [c async for c in replica.generate(req.model_copy(update={"request_id": rid}))]
            assert chunks[0].replica_id == replica.replica_id  # x-replica-id: first chunk of the attempt
            assert all(c.replica_id is None for c in chunks[1:])
        v = reg.get_sample_value
        await wait_until_async(lambda: (v("llmc_prefix_cache_hit_tokens_total", labels) or 0) >= 12, 5, 0.01)
        assert v("llmc_prefix_cache_query_tokens_total", labels) >= 24
        await wait_until_async(
            lambda: (v("llmc_redis_fallbacks_total", {"component": "publisher", "reason": "error"}) or 0) >= 1, 5, 0.01)
        assert replica.metrics.running
        replica.__del__()  # what Serve calls on shutdown
        await asyncio.sleep(0)
        assert not replica.metrics.running
        await asyncio.wait_for(replica._publisher_task, 5)
    finally:
        replica.engine.shutdown(timeout=1)


# ---------------------------------------------------------------- autoscaling policy


class CountingRecorder(MetricsRecorder):
    def __init__(self, registry):
        super().__init__(["llmc_autoscaling_desired_replicas", "llmc_autoscaling_actual_replicas"], ray=False,
                         registry=registry)
        self.sets = 0

    def set(self, name, value, **labels):
        self.sets += 1
        super().set(name, value, **labels)


def test_autoscaling_policy_records_desired_and_actual_only_on_change():
    reg = CollectorRegistry()
    rec = CountingRecorder(reg)
    p = policy(metrics=rec)
    v = lambda name: reg.get_sample_value(name, {"application": "llm-cluster", "deployment": "LLMReplica"})  # noqa: E731
    n, s = p(ctx([q(waiting=12)], 1, now=100.0))                    # 12 waiting -> 3 (no upscale delay)
    assert n == 3
    assert v("llmc_autoscaling_desired_replicas") == 3 and v("llmc_autoscaling_actual_replicas") == 1
    assert rec.sets == 2
    for t in range(10):                                              # steady ticks: the gauges are not touched
        p(ctx([q(waiting=12)], 1, now=100.1 + t * 0.1, state=s))
    assert rec.sets == 2
    p(ctx([q(waiting=4), q(waiting=4), q(waiting=4)], 3, now=102.0))  # the new replicas run: actual changes
    assert v("llmc_autoscaling_actual_replicas") == 3 and v("llmc_autoscaling_desired_replicas") == 3
    assert rec.sets == 4


def test_autoscaling_gauges_keep_two_applications_apart():
    """Two apps in one Serve controller (e.g. two models) each get their own series."""
    reg = CollectorRegistry()
    rec = CountingRecorder(reg)
    a, b = policy(metrics=rec), policy(metrics=rec)
    a(ctx([q(waiting=12)], 1, now=100.0))                                   # app llm-cluster wants 3
    other = ctx([q(waiting=0)], 2, now=100.0)
    other.app_name = "other-model"
    b(other)                                                                # the other app stays at 2
    labels = lambda app: {"application": app, "deployment": "LLMReplica"}  # noqa: E731
    assert reg.get_sample_value("llmc_autoscaling_desired_replicas", labels("llm-cluster")) == 3
    assert reg.get_sample_value("llmc_autoscaling_desired_replicas", labels("other-model")) == 2
    assert reg.get_sample_value("llmc_autoscaling_actual_replicas", labels("other-model")) == 1


# ---------------------------------------------------------------- x-replica-id


@pytest.mark.parametrize("stream", [False, True])
async def test_replica_id_header_names_the_serving_replica(make_api, stream):
    _, _, client = make_api([FakeReplica("a")])
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "stream": stream})
    assert r.status_code == 200 and r.headers["x-replica-id"] == "a"


@pytest.mark.parametrize("stream", [False, True])
async def test_replica_id_header_after_a_retry_names_the_replica_that_answered(make_api, stream):
    _, _, client = make_api([FakeReplica("a", fail_on_call=True), FakeReplica("b")])
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "stream": stream})
    assert r.status_code == 200 and r.headers["x-replica-id"] == "b"


@pytest.mark.parametrize("stream", [False, True])
async def test_replica_id_header_with_mid_stream_failover(make_api, stream):
    """A stream's headers are sent with its first chunk: they name the first replica. A non-streamed
    response names the replica that finished it."""
    _, _, client = make_api([FakeReplica("a", die_after_chunks=3, error=ReplicaDied), FakeReplica("b")])
    r = await client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "stream": stream})
    assert r.status_code == 200
    if stream:
        assert sum(1 for e in sse_events(r.text) if e["choices"]) == 8
    assert r.headers["x-replica-id"] == ("a" if stream else "b")


async def test_replica_id_header_lists_each_prompts_replica_once(make_api):
    _, _, client = make_api([FakeReplica("a"), FakeReplica("b")])  # round robin: prompt k on replica k % 2
    r = await client.post("/v1/completions", json={"prompt": [PROMPT, PROMPT[1:], PROMPT[2:]], "max_tokens": 2})
    assert r.status_code == 200 and r.headers["x-replica-id"] == "a,b"
