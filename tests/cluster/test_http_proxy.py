"""`router.http_proxy`: what answers on host:port. `serve` (the default) is Ray Serve's Python proxy actor;
`haproxy` runs Ray Serve's HAProxy ingress, each ingress replica serving HTTP itself. A launcher serving
through HAProxy: tests/e2e/test_launcher_fate.py."""
from __future__ import annotations

import pytest

from cluster.config import load_config
from cluster.launcher import ingress_env


def test_serve_proxy_is_the_default_and_needs_no_environment(tmp_path):
    cfg = load_config()
    assert cfg.router.http_proxy == "serve"
    assert ingress_env(cfg, str(tmp_path)) == {}


def test_haproxy_environment_is_private_to_one_cluster(tmp_path):
    cfg = load_config(overrides={"router.http_proxy": "haproxy"})
    a, b = ingress_env(cfg, str(tmp_path / "a")), ingress_env(cfg, str(tmp_path / "b"))
    assert a["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == a["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    # Two clusters on one host must not share HAProxy's config, admin socket or state files.
    for key in ("RAY_SERVE_HAPROXY_CONFIG_FILE_LOC", "RAY_SERVE_HAPROXY_SOCKET_PATH",
                "RAY_SERVE_HAPROXY_SERVER_STATE_FILE"):
        assert a[key].startswith(str(tmp_path / "a")) and b[key].startswith(str(tmp_path / "b"))
    # Nor HAProxy's fixed default ports (8404 stats, 9101 metrics): a second cluster's HAProxy would not start.
    ports = {int(a["RAY_SERVE_HAPROXY_METRICS_PORT"]), int(a["RAY_SERVE_HAPROXY_STATS_PORT"])}
    assert len(ports) == 2 and not ports & {8404, 9101}


def test_unknown_http_proxy_is_refused():
    from cluster.config import ConfigError
    with pytest.raises(ConfigError, match="http_proxy"):
        load_config(overrides={"router.http_proxy": "nginx"})
