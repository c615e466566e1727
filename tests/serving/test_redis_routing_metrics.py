"""The request router's Redis trouble on the ingress's GET /metrics: prefix index lookup failures by reason,
requests routed without the index (llmc_redis_fallbacks_total{component="router"}) and the breaker state,
with Redis refusing connections, hung (SIGSTOP: lookups time out), and back. The routers' totals are per
process and per model, so each test routes its own model id."""
from __future__ import annotations

import asyncio
import itertools
import time
import types

from prometheus_client.parser import text_string_to_metric_families

from cluster.ports import free_port
from kvstore.index import RedisPrefixIndex
from router.metrics import RouterMetrics
from router.replica_choice import redis_routing_stats
from tests.fixtures.fake_replicas import metric_value
from tests.fixtures.wait import wait_until_async
from tests.serving.test_routing import FakeReplica, choose, make_router, pending

PROMPT = list(range(100, 126))
_models = itertools.count()


def routed(model: str, index=None, **params):
    """A KVAwareRouter for `model` (tests.serving.test_routing's, whose requests are hashed for model "m")."""
    router = make_router(index=index, **params)
    router.chooser.params = router.chooser.params.model_copy(update={"model_id": model})
    return router


def scrape(metrics: RouterMetrics) -> dict[tuple[str, tuple], float]:
    """GET /metrics' text, parsed: (sample name, sorted labels) -> value."""
    text = metrics.render().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def failures(page, model, reason):
    return page.get(("llmc_router_index_lookup_failures_total", (("model", model), ("reason", reason))))


def fallbacks(page, reason):
    return page.get(("llmc_redis_fallbacks_total", (("component", "router"), ("reason", reason))))


def breaker(page, model):
    return page.get(("llmc_router_redis_breaker_state", (("model", model),)))


async def test_redis_down_counts_errors_then_breaker_skips_and_the_breaker_state():
    model = f"down-{next(_models)}"
    index = RedisPrefixIndex(f"redis://127.0.0.1:{free_port()}/0", timeout_s=1.0, breaker_s=1.0)  # refused
    router = routed(model, index)
    metrics = RouterMetrics(model, ray=False)
    page = scrape(metrics)
    assert breaker(page, model) == 0.0 and failures(page, model, "error") is None  # nothing failed yet: closed
    a, b = FakeReplica("a", running=3), FakeReplica("b")
    for _ in range(3):
        assert (await choose(router, [a, b], pending(PROMPT)))[0] == "b"  # by load
    page = scrape(metrics)
    assert failures(page, model, "error") == 1  # refused: then the breaker answers for Redis
    assert failures(page, model, "breaker_open") == 2 and failures(page, model, "timeout") is None
    assert fallbacks(page, "error") == 1 and fallbacks(page, "breaker_open") == 2
    assert breaker(page, model) == 1.0
    time.sleep(1.05)
    assert breaker(scrape(metrics), model) == 0.5  # half-open with time alone: the next lookup probes Redis
    await choose(router, [a, b], pending(PROMPT))
    page = scrape(metrics)
    assert breaker(page, model) == 1.0 and failures(page, model, "error") == 2
    # The same figures as a typed record (what `llm-cluster status` gets from each ingress replica).
    s = redis_routing_stats(model)
    assert s.breaker == "open" and s.lookup_failures == {"error": 2, "breaker_open": 2}
    assert s.fallbacks == {"error": 2, "breaker_open": 2}
    # Ray's copy, recorded by the router itself (here into the test's registry).
    assert router.registry.get_sample_value("llmc_router_index_lookup_failures_total",
                                            {"model": model, "reason": "breaker_open"}) == 2
    assert router.registry.get_sample_value("llmc_router_redis_breaker_state", {"model": model}) == 1.0
    await index.close()


async def test_hung_redis_counts_timeouts_and_the_breaker_closes_when_it_answers(redis_server, redis_url):
    model = f"hung-{next(_models)}"
    index = RedisPrefixIndex(redis_url, timeout_s=0.2, breaker_s=1.0)
    await index.warm()  # the first lookup is one round trip, well within its budget on a busy box
    a, b = FakeReplica("a", running=2), FakeReplica("b", running=1)
    router = routed(model, index)
    metrics = RouterMetrics(model, ray=False)
    await choose(router, [a, b], pending(PROMPT))
    page = scrape(metrics)
    assert breaker(page, model) == 0.0 and failures(page, model, "timeout") is None  # answered: closed
    redis_server.pause()
    try:
        for k in range(4):
            await choose(router, [a, b], pending([k, *PROMPT]))
        page = scrape(metrics)
        assert failures(page, model, "timeout") == 1 and failures(page, model, "breaker_open") == 3
        assert fallbacks(page, "timeout") == 1 and fallbacks(page, "breaker_open") == 3
        assert failures(page, model, "error") is None and breaker(page, model) == 1.0
    finally:
        redis_server.resume()

    async def breaker_closed() -> bool:  # past the skip period, a lookup reaches Redis again
        if breaker(scrape(metrics), model) == 0.0:
            return True
        await asyncio.sleep(0.1)
        await choose(router, [a, b], pending(PROMPT))
        return False
    await wait_until_async(breaker_closed, 5, 0, lambda: f"the breaker closed: {scrape(metrics)}")
    assert failures(scrape(metrics), model, "timeout") >= 1
    await index.close()


async def test_unusable_redis_url_counts_fallbacks_without_lookups():
    """A Redis URL no index can be made from: every request falls back ("error"), no lookup is made, no
    breaker exists."""
    model = f"badurl-{next(_models)}"
    router = routed(model, None)
    router.chooser._index = None  # noqa: SLF001 — make it from the URL, as in Serve
    router.chooser.params = router.chooser.params.model_copy(update={"redis_url": "nosuchscheme://x"})
    metrics = RouterMetrics(model, ray=False)
    for _ in range(2):
        await choose(router, [FakeReplica("a"), FakeReplica("b")], pending(PROMPT))
    page = scrape(metrics)
    assert fallbacks(page, "error") == 2 and failures(page, model, "error") is None and breaker(page, model) is None


async def test_ingress_metrics_endpoint_shows_its_process_routers(make_api):
    """GET /metrics of the ingress app itself: the request routers of its process, for its model."""
    api, _, client = make_api()
    model = api.metrics.model
    before = redis_routing_stats(model).lookup_failures.get("error", 0)
    index = RedisPrefixIndex(f"redis://127.0.0.1:{free_port()}/0", timeout_s=1.0, breaker_s=5)
    router = routed(model, index)
    for _ in range(2):
        await choose(router, [FakeReplica("a"), FakeReplica("b")], pending(PROMPT))
    text = (await client.get("/metrics")).text
    series = f'llmc_router_index_lookup_failures_total{{model="{model}",reason="error"}}'
    assert metric_value(text, series) == before + 1
    assert metric_value(text, f'llmc_router_index_lookup_failures_total{{model="{model}",reason="breaker_open"}}') >= 1
    assert metric_value(text, 'llmc_redis_fallbacks_total{component="router",reason="error"}') >= 1
    assert metric_value(text, f'llmc_router_redis_breaker_state{{model="{model}"}}') == 1.0
    stats = await _ingress_redis_routing(api)
    assert stats.breaker == "open" and stats.lookup_failures["error"] == before + 1
    await index.close()


async def _ingress_redis_routing(api):
    """OpenAIIngress.redis_routing (what `llm-cluster status` broadcasts), outside Serve."""
    from router.api import OpenAIIngress

    return await OpenAIIngress.redis_routing(types.SimpleNamespace(router=api))

