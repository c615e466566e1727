"""`llm-cluster serve --set engine.quantization=int8` answers over REST, and its replica really runs int8: the
first token's logprob equals the in-process int8 engine's and differs from the unquantised engine's."""
from __future__ import annotations

import os
import signal
import subprocess

import httpx
import pytest

from tests.fixtures.engine import greedy, make_engine, random_prompts, request, run_all

START_TIMEOUT_S = 240.0


def _first_logprob(engine, prompt: list[int]) -> tuple[int, float]:
    chunk = run_all(engine, [request("x", prompt, greedy(1, logprobs=0))])["x"][0]
    return chunk.token_ids[0], chunk.logprobs[0].logprob


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(420)
def test_serve_int8_answers_over_rest(launch, tiny_model_dir):
    int8, none = make_engine(tiny_model_dir, quantization="int8"), make_engine(tiny_model_dir)
    # A prompt whose first-token logprob int8 visibly moves.
    for prompt in random_prompts(8, 472, 8, 24, seed=51):
        (_, lp), (_, lp_none) = _first_logprob(int8, prompt), _first_logprob(none, prompt)
        if abs(lp - lp_none) > 1e-2:
            break
    else:
        pytest.fail("int8 moved no first-token logprob on the tiny model")
    del int8, none

    cli = launch("--model", str(tiny_model_dir), "--set", "engine.quantization=int8")
    proc, base = cli.proc, cli.base
    try:
        cli.wait_serving(START_TIMEOUT_S, said=False)
        model = httpx.get(base + "/v1/models", timeout=10).json()["data"][0]["id"]
        r = httpx.post(base + "/v1/completions", timeout=60,
                       json={"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0, "logprobs": 0})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] in ("length", "stop")
        got = choice["logprobs"]["token_logprobs"][0]
        assert abs(got - lp) < 1e-3, (got, lp, lp_none)
        assert abs(got - lp_none) > 5e-3
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
