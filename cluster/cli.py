"""The `llm-cluster` command: serve (the local launcher), prepare-model, status, bench."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib.metadata import entry_points

from cluster.config import ConfigError, load_config

COMMANDS_GROUP = "llm_cluster.commands"  # subcommands that packages above this one provide (load_tests: bench)

# Shortcut flags: flag -> dotted config key. Anything else goes through --set section.field=value.
SHORTCUTS = {
    "model": "engine.model", "tp_size": "engine.tp_size", "host": "router.host", "port": "router.port",
    "policy": "router.policy", "replicas": "replicas.num_replicas", "redis_url": "redis_url",
    "max_model_len": "engine.max_model_len", "block_size": "engine.block_size",
}


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override any config field (repeatable)")
    for flag, key in SHORTCUTS.items():
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, help=f"same as --set {key}=...")


def _load(args: argparse.Namespace):
    overrides = list(args.overrides)
    overrides += [f"{key}={getattr(args, flag)}" for flag, key in SHORTCUTS.items() if getattr(args, flag) is not None]
    return load_config(args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-cluster", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_serve = sub.add_parser("serve", help="start Ray, Redis and the OpenAI endpoint; Ctrl-C stops all")
    _config_args(p_serve)
    p_prep = sub.add_parser("prepare-model", help="convert the embedded SmolLM2 GGUF to safetensors (once)")
    p_prep.add_argument("--force", action="store_true")
    p_status = sub.add_parser("status", help="replicas, health, queues, Redis, autoscaler")
    p_status.add_argument("--address", default="auto", help="Ray address of the running cluster")
    p_status.add_argument("--json", action="store_true")
    p_status.add_argument("--app", default="llm-cluster")
    p_status.add_argument("--redis-url", help="Redis to PING (default: REDIS_URL, else asked of the cluster)")
    sub.add_parser("bench", add_help=False, help="the standard benchmark suite on local clusters: "
                   "`python -m load_tests suite` with the same options (e.g. --out DIR --quick --steps a,b)")
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "bench":  # its options belong to `python -m load_tests suite`, which parses them
        return _bench(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        if args.cmd == "serve":
            from cluster.launcher import serve_forever
            from cluster.model_check import check_engine_model
            cfg = _load(args)
            # Before Ray, Redis or Serve start: a model the engine cannot load is one line and exit 2 here,
            # not a traceback from a replica after the whole cluster came up.
            check_engine_model(cfg.engine)
            serve_forever(cfg)
        elif args.cmd == "prepare-model":
            from replicas.engine.model_prep import prepare_embedded_model
            print(prepare_embedded_model(force=args.force))
        elif args.cmd == "status":
            from cluster.status import collect_status, render_table
            report = collect_status(address=args.address, app_name=args.app, redis_url=args.redis_url)
            print(json.dumps(report, indent=2, default=str) if args.json else render_table(report))
    except ConfigError as e:
        print(f"llm-cluster: {e}", file=sys.stderr)
        return 2
    return 0


def _bench(suite_args: list[str]) -> int:
    # load_tests sits above this package: it plugs its suite in through an entry point instead of being imported.
    found = entry_points(group=COMMANDS_GROUP, name="bench")
    if not found:
        print("llm-cluster: bench needs the load_tests package installed with llm-cluster", file=sys.stderr)
        return 2
    return next(iter(found)).load()(suite_args)


if __name__ == "__main__":
    sys.exit(main())
