"""Multi-node failover scenario, run in its own process (it needs its own Ray cluster, apart from the
test session's): a head node plus two workers on this machine (`ray.cluster_utils.Cluster`), two
LLMReplicas spread one per node, closed-loop load through the HTTP ingress, then one worker node that
holds a replica is removed. Prints one JSON line with what it saw.

    python -m tests.e2e.multinode_scenario MODEL_DIR
"""
from __future__ import annotations

import json
import sys
import time


def main(model_dir: str) -> dict:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from cluster.app import ingress_options, replica_options
    from cluster.ports import free_port
    from load_tests.bench_autoscaling import (
        APP,
        REPLICA,
        TEST_ENV,
        ClosedLoop,
        replica_states,
        running_replicas,
        tiny_config,
        wait_ready,
    )
    from replicas.deployment import LLMReplica
    from router.api import OpenAIIngress
    from tests.fixtures.wait import wait_until

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"head": 1}, "gcs_server_port": free_port(), "include_dashboard": False,
        "dashboard_agent_listen_port": free_port()})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    t_start = time.monotonic()
    out: dict = {"nodes": 1 + len(workers)}
    try:
        ray.init(address=cluster.address, namespace="llmc-multinode", log_to_driver=False,
                 runtime_env={"env_vars": TEST_ENV})
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        base = f"http://127.0.0.1:{port}"

        cfg = tiny_config(model_dir, **{"replicas.num_replicas": 2, "replicas.max_replicas_per_node": 1})
        replica = serve.deployment(LLMReplica).options(**replica_options(cfg)).bind(cfg.replica_config())
        # The API tier stays on the head node with the proxy: this scenario loses a replica node, not the
        # node that holds the client's connection.
        ingress = {**ingress_options(cfg), "ray_actor_options": {"num_cpus": 0, "resources": {"head": 0.01}}}
        serve.run(serve.deployment(OpenAIIngress).options(**ingress).bind(cfg.ingress_config(), replica), name=APP,
                  route_prefix="/")
        wait_ready(base, 120)
        wait_until(lambda: running_replicas() == 2, 120, what=lambda: f"2 replicas (replicas: {replica_states()})")
        out["setup_s"] = round(time.monotonic() - t_start, 1)

        handle = serve.get_deployment_handle(REPLICA, APP)

        def placement() -> dict[str, str]:
            seen: dict[str, str] = {}
            for _ in range(20):
                try:
                    s = handle.stats.remote().result(timeout_s=10)
                except Exception:  # noqa: BLE001 - a replica going away under the call
                    continue
                seen[s.replica_id] = s.node_id
            return seen

        before = placement()
        out["placement_before"] = before
        by_id = {w.node_id: w for w in workers}
        victim = next(n for n in before.values() if n in by_id)

        load = ClosedLoop(base, concurrency=4, max_tokens=24).start()
        time.sleep(1)
        t0 = time.monotonic()
        cluster.remove_node(by_id[victim])
        out["replicas_after_removal"] = replica_states()

        def restored() -> bool:
            if running_replicas() != 2:
                return False
            now = placement()
            return len(now) == 2 and victim not in now.values() and len(set(now.values())) == 2
        wait_until(restored, 120, 0.5, lambda: f"2 replicas on the remaining nodes (replicas: {replica_states()})")
        out["restored_s"] = round(time.monotonic() - t0, 1)
        out["placement_after"] = placement()
        time.sleep(1)  # the new replica serves part of the load
        stats = load.stop()
        out.update(victim=victim, ok=stats.ok, failed=stats.failed, errors=stats.errors[:5],
                   max_latency_s=round(max(stats.latencies), 2))
    finally:
        # Killing the nodes stops Serve too; a graceful serve.shutdown() only adds time here.
        ray.shutdown()
        cluster.shutdown()
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])), flush=True)
