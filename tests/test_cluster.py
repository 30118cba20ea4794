"""A multi-node Ray cluster on one machine (ray.cluster_utils.Cluster: a head and GPU worker nodes, one logical GPU
each). A worker node removed without warning mid-run loses nothing: its encoder, its decode tasks and the objects in
its store go with it, and the run finishes on what is left. A GPU node that joins mid-run gets an encoder."""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from audio_fixtures import write_audio
from outputs import assert_codes_equal, read_output, reference_codes
from pipeline import manifest
from pipeline.config import RunConfig
from pipeline.runner import run

FILES_PER_SHARD = 2
NODE = {"num_cpus": 2, "object_store_memory": 150 * 2**20}


@pytest.fixture
def cluster():
    cluster = Cluster(initialize_head=True, head_node_args={
        **NODE, "num_gpus": 0, "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4,
                                                 "health_check_initial_delay_ms": 0}})
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def corpus(root: Path, n: int, seconds: float = 1.0) -> Path:
    for i in range(n):
        write_audio(root / f"clip{i:03d}.flac", "flac", 44_100, seconds + 0.1 * (i % 5), channels=2, seed=i)
    return root


def when(condition, action, timeout_s: float = 240.0) -> threading.Thread:
    """Run ``action`` in a thread once ``condition()`` holds (checked every 50 ms)."""
    def watch() -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if condition():
                action()
                return
            time.sleep(0.05)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def committed(out: Path) -> int:
    return len(list((out / "_state" / "shards").glob("*.json"))) if (out / "_state" / "shards").is_dir() else 0


def test_a_node_lost_mid_run_loses_nothing(cluster, tmp_path, tiny_model_path, caplog):
    workers = [cluster.add_node(**NODE, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    root, out = corpus(tmp_path / "in", 24), tmp_path / "out"
    removed = threading.Event()

    def remove_a_worker() -> None:
        cluster.remove_node(workers[1], allow_graceful=False)  # no warning: its raylet and workers are killed
        removed.set()

    watcher = when(lambda: committed(out) >= 3, remove_a_worker)
    cfg = RunConfig(input=str(root), output=str(out), model=tiny_model_path, files_per_shard=FILES_PER_SHARD,
                    progress_interval_s=5, max_failure_share=0.0, encoder_wait_s=120)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        assert run(cfg) == 0
    watcher.join(timeout=1)
    assert removed.is_set(), "the node was not removed while the run went on"
    final = manifest.read_manifest(str(out))
    assert final["status"] == "complete" and final["totals"]["failed_clips"] == 0
    assert_codes_equal(read_output(str(out)), reference_codes(str(root), tiny_model_path, 8, FILES_PER_SHARD))
    assert re.search(r"encoder \d+ died .* go back to the queue", caplog.text)


def test_a_gpu_node_joining_mid_run_gets_an_encoder(cluster, tmp_path, tiny_model_path, caplog):
    cluster.add_node(**NODE, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    root, out = corpus(tmp_path / "in", 36, seconds=40.0), tmp_path / "out"  # long enough for a node to join
    cfg = RunConfig(input=str(root), output=str(out), model=tiny_model_path, files_per_shard=FILES_PER_SHARD,
                    progress_interval_s=5, max_failure_share=0.0)
    codes = []
    with caplog.at_level(logging.INFO, logger="pipeline"):
        runner = threading.Thread(target=lambda: codes.append(run(cfg)), daemon=True)
        runner.start()  # (nodes are added from the main thread: Ray installs signal handlers)
        deadline = time.time() + 240
        while committed(out) < 1 and runner.is_alive() and time.time() < deadline:
            time.sleep(0.05)
        assert runner.is_alive(), "the run ended before a node could join"
        cluster.add_node(**NODE, num_gpus=1)
        runner.join(timeout=300)
    assert codes == [0]
    ups = re.findall(r"encoder (\d+) up: .* on node (\w+)", caplog.text)
    assert len({node for _, node in ups}) == 2, ups  # the second encoder runs on the node that joined
    assert_codes_equal(read_output(str(out)), reference_codes(str(root), tiny_model_path, 8, FILES_PER_SHARD))
