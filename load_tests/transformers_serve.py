"""`transformers serve` as a benchmark peer: the CLI that ships with transformers, started as a
subprocess on 127.0.0.1 on a local model directory, warmed up, and stopped (its whole process group)
on exit. The load client then talks to it exactly as it talks to our cluster.

Two quirks of transformers 5.x's server are handled here: it picks the model class from
`config.architectures`, which our prepared SmolLM2 directory does not carry (so it is served from a
directory of links with that one field added), and its GET /v1/models scans the Hub cache and fails
offline (so callers name the model: the id this yields).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import httpx

from cluster.ports import free_port
from load_tests.target import check_target


def servable_dir(model_dir: Path, scratch: Path) -> Path:
    """model_dir itself when its config names an architecture, else a directory of links to its files
    with `architectures` filled in from model_type (the transformers naming rule, e.g. LlamaForCausalLM)."""
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("architectures"):
        return model_dir
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[AutoConfig.for_model(config["model_type"]).model_type]
    shadow = scratch / model_dir.name
    shadow.mkdir()
    for f in model_dir.iterdir():
        if f.name != "config.json":
            (shadow / f.name).symlink_to(f.resolve())
    (shadow / "config.json").write_text(json.dumps({**config, "architectures": [arch]}, indent=1))
    return shadow


@contextlib.contextmanager
def transformers_serve(model_dir: str | os.PathLike, *, continuous_batching: bool = False, port: int | None = None,
                       start_timeout_s: float = 240.0, log_path: str | os.PathLike | None = None,
                       threads: int | None = None) -> Iterator[tuple[str, str]]:
    """Yield (base URL, model id) of a warmed-up `transformers serve` for model_dir on CPU."""
    port = port or free_port()
    base = f"http://127.0.0.1:{port}"
    check_target(base)
    exe = shutil.which("transformers") or os.path.join(os.path.dirname(sys.executable), "transformers")
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="llmc-tserve-")))
        served = servable_dir(Path(model_dir).expanduser(), scratch)
        log = stack.enter_context(open(log_path or scratch / "serve.log", "w+"))
        cmd = [exe, "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32",
               "--continuous-batching" if continuous_batching else "--no-continuous-batching", str(served)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        # Its own session: stopping it takes its uvicorn workers and any helper processes too.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        stack.callback(_stop, proc)
        _wait_healthy(base, proc, start_timeout_s, log)
        model = str(served)
        warm_up(base, model)
        yield base, model


def _wait_healthy(base: str, proc: subprocess.Popen, timeout_s: float, log) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"transformers serve exited with {proc.returncode}:\n{log.read()[-3000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"transformers serve not healthy within {timeout_s} s")


def warm_up(base: str, model: str) -> None:
    """One short chat answer: the first request pays one-off costs (lazy init, first kernels) that a
    throughput figure should not include. Our cluster gets the same warm-up."""
    r = httpx.post(base + "/v1/chat/completions", timeout=300, json={
        "model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4,
        "temperature": 0})
    r.raise_for_status()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)
