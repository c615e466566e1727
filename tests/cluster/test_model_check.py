"""Early model checks: `llm-cluster serve --model DIR` refuses a model the engine cannot load before it starts
Ray, Redis or Serve, with one line on stderr naming what is wrong and exit code 2."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.model_check import ModelCheckError, check_engine_model, check_model_dir

ROOT = Path(__file__).resolve().parents[2]


def _copy(src: Path, dst: Path, *, skip: tuple[str, ...] = (), **config_changes) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name not in skip:
            shutil.copy(f, dst / f.name)
    if config_changes:
        cfg = json.loads((src / "config.json").read_text())
        cfg.update(config_changes)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _bad_model(kind: str, tiny: Path, tmp: Path) -> Path:
    d = tmp / kind
    if kind == "missing":
        return d
    if kind == "no_config":
        return _copy(tiny, d, skip=("config.json",))
    if kind == "no_weights":
        return _copy(tiny, d, skip=("model.safetensors",))
    if kind == "architecture":
        return _copy(tiny, d, model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    if kind == "rope":
        return _copy(tiny, d, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    if kind == "quantized":
        return _copy(tiny, d, quantization_config={"quant_method": "awq", "bits": 4, "group_size": 128})
    if kind == "multimodal":
        return _copy(tiny, d, model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"])
    if kind == "activation":
        return _copy(tiny, d, hidden_act="relu2")
    raise AssertionError(kind)


# What the one line must name, per case.
EXPECTED = {
    "missing": "does not exist",
    "no_config": "has no config.json",
    "no_weights": "has no weight files",
    "architecture": "GPTNeoXForCausalLM",
    "rope": "unsupported rope_type 'dynamic'",
    "quantized": "quantization method 'awq' is not supported",
    "multimodal": "text-only model_type 'gemma3_text' is supported",
    "activation": "unsupported activation 'relu2'",
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_serve_refuses_a_bad_model_in_one_line_before_anything_starts(kind, tiny_model_dir, tmp_path):
    model = _bad_model(kind, tiny_model_dir, tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "RAY_ADDRESS")}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "serve", "--model", str(model)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr  # no traceback, no log lines of Ray or Redis starting
    assert lines[0].startswith("llm-cluster: ") and str(model) in lines[0] and EXPECTED[kind] in lines[0]
    assert proc.stdout == ""
    # Starting a local Ray node alone takes longer than this on this box; the check imports torch at most.
    assert elapsed < 20, f"took {elapsed:.1f}s"


def test_cli_exits_2_without_launching(monkeypatch, tiny_model_dir, tmp_path, capsys):
    # The direct proof that nothing starts: the launcher is never called.
    import cluster.launcher
    from cluster.cli import main

    def launched(cfg):
        raise AssertionError("the launcher was called for a model the engine cannot load")
    monkeypatch.setattr(cluster.launcher, "serve_forever", launched)
    monkeypatch.delenv("REDIS_URL", raising=False)
    model = _bad_model("rope", tiny_model_dir, tmp_path)
    assert main(["serve", "--model", str(model)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_the_check_imports_neither_ray_nor_torch(tiny_model_dir, tmp_path):
    # Fast on a loaded box too, and proof that Ray is not even imported before the model is refused.
    code = ("import sys; from cluster.cli import main; rc = main(['serve', '--model', sys.argv[1]]); "
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'torch'}); "
            "print(heavy); sys.exit(rc)")
    model = _bad_model("architecture", tiny_model_dir, tmp_path)
    proc = subprocess.run([sys.executable, "-c", code, str(model)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout.strip() == "[]", (proc.stdout, proc.stderr)


def test_a_valid_model_passes(tiny_model_dir, tiny_model_factory):
    assert check_model_dir(tiny_model_dir) == tiny_model_dir
    check_model_dir(tiny_model_factory(arch="qwen3"))
    from replicas.engine.config import EngineConfig
    check_engine_model(EngineConfig(model=str(tiny_model_dir)))
    # The embedded default is converted by model_prep into a model the engine runs: not checked (nor prepared) here.
    check_engine_model(EngineConfig())


def test_supported_rope_scalings_pass_in_either_spelling(tiny_model_dir, tmp_path):
    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    check_model_dir(_copy(tiny_model_dir, tmp_path / "llama3", rope_parameters=llama3))
    old_style = _copy(tiny_model_dir, tmp_path / "linear", rope_parameters=None, rope_theta=10000.0,
                      rope_scaling={"type": "linear", "factor": 2.0})
    check_model_dir(old_style)
    check_model_dir(_copy(tiny_model_dir, tmp_path / "yarn", rope_parameters=None,
                          rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    longrope = {"rope_type": "longrope", "rope_theta": 1e4, "long_factor": [2.0] * 8, "short_factor": [1.0] * 8}
    check_model_dir(_copy(tiny_model_dir, tmp_path / "longrope", rope_parameters=longrope))
    with pytest.raises(ModelCheckError, match="unsupported rope_type 'dynamic'"):
        check_model_dir(_copy(tiny_model_dir, tmp_path / "dynamic", rope_parameters=None,
                              rope_scaling={"rope_type": "dynamic", "factor": 4.0}))


def test_other_refusals_name_the_problem(tiny_model_dir, tmp_path):
    with pytest.raises(ModelCheckError, match="is not a directory"):
        check_model_dir(tiny_model_dir / "config.json")
    bad_json = _copy(tiny_model_dir, tmp_path / "bad_json")
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(ModelCheckError, match=r"config\.json is not valid JSON"):
        check_model_dir(bad_json)
    # The engine loads safetensors only: a PyTorch-pickle checkpoint is named as such.
    bin_only = _copy(tiny_model_dir, tmp_path / "bin_only", skip=("model.safetensors",))
    (bin_only / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelCheckError, match=r"pytorch_model\*\.bin weights only"):
        check_model_dir(bin_only)
    sharded = _copy(tiny_model_dir, tmp_path / "sharded", skip=("model.safetensors",))
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ModelCheckError, match="missing weight files its index names: model-00001"):
        check_model_dir(sharded)


def test_the_engine_refuses_the_same_configs():
    # One source of truth: the replica's ModelArgs refuses with the message the launcher's check prints.
    from replicas.engine.models.args import ModelArgs
    cfg = json.loads(json.dumps({"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
                                 "num_hidden_layers": 1, "num_attention_heads": 2}))
    ModelArgs.from_dict(cfg)
    with pytest.raises(ValueError, match="quantization method 'awq' is not supported"):
        ModelArgs.from_dict({**cfg, "quantization_config": {"quant_method": "awq"}})
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt_neox' \(architecture: GPTNeoXForCausalLM"):
        ModelArgs.from_dict({**cfg, "model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]})
    with pytest.raises(ValueError, match="unsupported rope_type 'dynamic'"):
        ModelArgs.from_dict({**cfg, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    # Gemma 3 nests its rope by layer type: an unsupported one in either is refused.
    with pytest.raises(ValueError, match="unsupported rope_type 'dynamic'"):
        ModelArgs.from_dict({**cfg, "model_type": "gemma3_text", "rope_parameters": {
            "full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "dynamic"}}})
    for family in ("gemma2", "gemma3_text", "phi3", "mixtral", "qwen2_moe", "qwen3_moe"):
        ModelArgs.from_dict({**cfg, "model_type": family})
