"""One model per family through the REST API on a real local Ray Serve cluster (the session's, one app at a
time): Gemma 3 (alternating sliding/global), Phi-4-mini (longrope, partial rotary, fused checkpoints), Qwen2-MoE
(routed experts and a shared expert), Mistral (every layer sliding: blocks freed behind the window).
Concurrent completions on token-id prompts longer than the window and than longrope's original context return
transformers' greedy continuation."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from load_tests.tiny_model import build_family_model
from tests.fixtures.configs import cluster_config
from tests.fixtures.engine import HFReference, random_prompts

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

FAMILIES = ["gemma3", "phi4-mini-longrope", "qwen2-moe", "mistral-window"]
MAX_NEW = 8


@pytest.fixture(scope="module", params=FAMILIES)
def served(request, serve_app, tmp_path_factory):
    family = request.param
    model_dir = build_family_model(tmp_path_factory.mktemp(family), family)
    cfg = cluster_config(model_dir, {
        "engine.model_id": family, "engine.num_kv_blocks": 64, "engine.max_num_batched_tokens": 16,
        "engine.max_model_len": 256, "replicas.num_replicas": 1, "replicas.num_cpus": 0.5})
    with serve_app(cfg, name=f"family-{family}", wait_s=240) as app:  # one family's app at a time
        yield family, model_dir, app.base


def test_completions_equal_transformers(served):
    from replicas.engine.detokenizer import IncrementalDetokenizer
    family, model_dir, base = served
    client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
    hf = HFReference(model_dir)
    prompts = random_prompts(4, hf.model.config.vocab_size, 3, 45, seed=5)

    def complete(p):
        r = client.completions.create(model=family, prompt=p, max_tokens=MAX_NEW, temperature=0,
                                      extra_body={"ignore_eos": True})
        return r.choices[0].text, r.usage.completion_tokens

    with ThreadPoolExecutor(len(prompts)) as pool:  # one batch mixing lengths on the replica
        results = list(pool.map(complete, prompts))
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    for p, (text, n) in zip(prompts, results):
        detok = IncrementalDetokenizer(tok, p)
        want = detok.append(hf.generate(p, MAX_NEW)) + detok.flush()
        assert n == MAX_NEW and text == want, f"{family}: prompt of {len(p)} tokens"
