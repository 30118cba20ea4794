"""Check a Ray cluster before a long ``mimi-tokenize run`` job: run it as a job entrypoint (or anywhere that can
join the cluster) and it runs one task on every alive node, which reports

* whether ``mimi-tokenize`` is importable there (the image or the job's runtime_env provides it), and its version;
* which of the environment variables named with ``--require-env`` are set in the worker's environment -- presence
  only, never the value, so the job logs stay free of secrets;
* the GPUs Ray sees on the node and whether torch sees CUDA, from a task that holds one of the node's GPUs (as an
  encoder does: Ray sets ``CUDA_VISIBLE_DEVICES`` only for tasks that request GPUs).

    ray job submit --address "$RAY_ADDRESS" --working-dir . -- python jobs/preflight.py --require-env HF_TOKEN

Exit code 0 when every node has the package and every required variable, else 1 (one line per problem).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy


@ray.remote(num_cpus=0)
def _inspect_node(names: list[str]) -> dict:
    report = {"hostname": socket.gethostname(), "pid": os.getpid(), "python": sys.version.split()[0],
              "env": {name: bool(os.environ.get(name)) for name in names}, "gpu_ids": ray.get_gpu_ids()}
    try:
        from importlib.metadata import version

        import pipeline.runner  # noqa: F401  (imports torch, the model code and the runner, as an encoder does)
        import torch

        report["package"] = version("mimi-tokenize")
        report["cuda_available"] = torch.cuda.is_available()
    except Exception as exc:  # noqa: BLE001  (reported, not raised: the point is to list every node's problems)
        report["package"] = None
        report["import_error"] = f"{type(exc).__name__}: {exc}"
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--require-env", action="append", default=[], metavar="NAME",
                        help="an environment variable every worker must have (repeatable); only its presence is "
                             "reported")
    parser.add_argument("--address", default="auto", help="Ray address (default auto: the job's own cluster)")
    args = parser.parse_args(argv)

    ray.init(address=args.address, log_to_driver=False)
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        refs = [_inspect_node.options(num_gpus=1 if n["Resources"].get("GPU") else 0,
                                      scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(args.require_env) for n in nodes]
        reports = ray.get(refs, timeout=600)
    finally:
        ray.shutdown()

    problems = []
    for node, report in zip(nodes, reports):
        report["node_id"], report["node_ip"] = node["NodeID"], node["NodeManagerAddress"]
        report["ray_gpus"] = node["Resources"].get("GPU", 0)
        print("preflight node " + json.dumps(report, sort_keys=True), flush=True)
        where = f"node {report['node_ip']} ({report['hostname']})"
        if report["package"] is None:
            problems.append(f"{where}: mimi-tokenize is not importable: {report['import_error']}")
        problems += [f"{where}: {name} is not set in the workers' environment"
                     for name, present in report["env"].items() if not present]
    for problem in problems:
        print(f"preflight: {problem}", file=sys.stderr)
    print(f"preflight: {len(nodes)} node(s), {'OK' if not problems else f'{len(problems)} problem(s)'}", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
