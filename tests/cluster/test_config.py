"""Config: YAML < env < CLI precedence, errors that name the field, Serve args, Serve options."""
from __future__ import annotations

import textwrap

import pytest

from cluster.app import config_from_args, replica_options
from cluster.cli import main as cli_main
from cluster.config import ConfigError, load_config


def _yaml(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def test_defaults_are_the_embedded_cluster():
    cfg = load_config(env={})
    assert cfg.engine.model == "embedded"
    assert cfg.router.host == "127.0.0.1" and cfg.router.port == 8000
    assert cfg.redis_url is None and cfg.router.api_keys == []


def test_yaml_then_env_then_cli_precedence(tmp_path):
    path = _yaml(tmp_path, """
        engine: {block_size: 32, max_num_seqs: 8}
        router: {policy: pow2, port: 9000}
    """)
    env = {"LLM_CLUSTER_ENGINE__BLOCK_SIZE": "64", "LLM_CLUSTER_ROUTER__PORT": "9100",
           "REDIS_URL": "redis://127.0.0.1:7777/0", "LLM_CLUSTER_API_KEYS": "k1, k2"}
    cfg = load_config(path, ["router.port=9200"], env=env)
    assert cfg.engine.max_num_seqs == 8            # YAML only
    assert cfg.engine.block_size == 64             # env beats YAML
    assert cfg.router.policy == "pow2"
    assert cfg.router.port == 9200                 # CLI beats env
    assert cfg.redis_url == "redis://127.0.0.1:7777/0"
    assert [k.get_secret_value() for k in cfg.router.api_keys] == ["k1", "k2"]


def test_bad_yaml_value_names_the_field(tmp_path):
    path = _yaml(tmp_path, "engine: {block_size: lots}\n")
    with pytest.raises(ConfigError, match=r"engine\.block_size") as e:
        load_config(path, env={})
    assert "lots" in str(e.value)


@pytest.mark.parametrize("override, field", [
    ("router.policy=fastest", "router.policy"),
    ("engine.tp_size=0", "engine.tp_size"),
    ("engine.unknown_knob=1", "engine.unknown_knob"),
    ("autoscaling.min_replicas=5", "autoscaling"),
])
def test_bad_override_names_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(overrides=[override], env={})


def test_unparseable_inputs_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml", env={})
    with pytest.raises(ConfigError, match="mapping"):
        load_config(_yaml(tmp_path, "- a\n- b\n"), env={})
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(overrides=["no-equals-sign"], env={})


def test_cli_flags_reach_the_config(monkeypatch, tmp_path, capsys):
    seen = {}
    monkeypatch.setattr("cluster.launcher.serve_forever", lambda cfg: seen.setdefault("cfg", cfg))
    path = _yaml(tmp_path, "router: {port: 9000}\n")
    rc = cli_main(["serve", "-c", str(path), "--port", "9300", "--policy", "round_robin",
                   "--set", "engine.max_num_seqs=4"])
    assert rc == 0
    cfg = seen["cfg"]
    assert (cfg.router.port, cfg.router.policy, cfg.engine.max_num_seqs) == (9300, "round_robin", 4)
    assert cli_main(["serve", "--set", "engine.block_size=abc"]) == 2
    assert "engine.block_size" in capsys.readouterr().err


def test_serve_args_nested_and_dotted():
    cfg = config_from_args({"engine": {"block_size": 8}, "router.policy": "pow2",
                            "router": {"api_keys": ["secret"]}})
    assert cfg.engine.block_size == 8 and cfg.router.policy == "pow2"
    assert cfg.router.api_keys[0].get_secret_value() == "secret"
    assert "secret" not in repr(cfg)  # keys never end up in logs through the config's repr


def test_serve_options_from_config():
    cpu = replica_options(config_from_args({"engine.tp_size": "2", "replicas.num_replicas": "3",
                                            "replicas.num_gpus": "0"}))
    assert cpu["placement_group_bundles"] == [{"CPU": 1}, {"CPU": 1}]
    assert cpu["placement_group_strategy"] == "STRICT_PACK" and cpu["num_replicas"] == 3
    gpu = replica_options(config_from_args({"engine.tp_size": "2", "replicas.num_gpus": "1",
                                            "autoscaling.enabled": "true", "autoscaling.max_replicas": "6"}))
    assert gpu["placement_group_bundles"] == [{"CPU": 1, "GPU": 1}] * 2
    assert gpu["autoscaling_config"]["max_replicas"] == 6 and "num_replicas" not in gpu
    single = replica_options(config_from_args({}))
    assert "placement_group_bundles" not in single
