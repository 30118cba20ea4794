"""``mimi-tokenize run`` as a Ray job on a real Ray cluster started with ``ray start --head`` (dashboard, Jobs API),
the way it runs on a real cluster; plus the job files under ``jobs/`` (runtime_env, submit script, KubeRay RayJob).

The cluster is this test module's own:

* its ``--temp-dir`` is a fresh folder, so ``ray start`` records its address in ``<temp-dir>/ray_current_cluster``
  and not in ``/tmp/ray/ray_current_cluster``: a plain ``ray.init()`` elsewhere in the suite (which joins the
  cluster named there, or starts its own) never joins this one. Every port is a free one picked here, so it does
  not collide with other local Ray instances either. Nothing here sets ``RAY_ADDRESS`` in the test process.
* it is shut down by killing exactly its processes: every process of the cluster (GCS, raylet, dashboard, workers,
  job drivers) inherits the environment of ``ray start``, which carries a marker unique to this module. ``ray stop``
  is not used: it kills every Ray process on the machine, including the ``ray.init()`` instances of tests that run
  at the same time. The teardown fails if a process of the cluster survives.
* a fake ``HF_TOKEN`` is in the cluster's environment only (the way Kubernetes secrets reach pods): the jobs'
  workers must see it, and it must appear in no job log, job record, output file or Ray log.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

import mimi
from audio_fixtures import write_audio
from pipeline import manifest
from pipeline.prepare import prepare_shard
from pipeline.sources import discover_shards
from pipeline.writer import read_codes

ray_job_submission = pytest.importorskip("ray.job_submission")
JobStatus, JobSubmissionClient = ray_job_submission.JobStatus, ray_job_submission.JobSubmissionClient

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"
SECRET = f"hf_test_secret_{uuid.uuid4().hex}"
MARKER_VAR = "MIMI_JOBS_TEST_CLUSTER"
FILES_PER_SHARD = 2
NUM_CODEBOOKS = 8
JOB_TIMEOUT_S = 120


# --- the cluster ------------------------------------------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _cluster_pids(marker: str) -> list[int]:
    """Processes whose environment carries ``MARKER_VAR=marker``: exactly the ones this module's cluster started."""
    needle = f"{MARKER_VAR}={marker}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            pass
    return pids


def _kill_cluster(marker: str, grace_s: float = 3.0) -> list[int]:
    """SIGTERM the cluster's processes, SIGKILL what is left after ``grace_s``; return the pids still alive."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 3.0)):
        for pid in _cluster_pids(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait_s
        while _cluster_pids(marker) and time.time() < deadline:
            time.sleep(0.2)
    return _cluster_pids(marker)


@pytest.fixture(scope="module")
def cluster() -> Iterator[dict]:
    """A one-node Ray cluster (2 CPUs, no GPU) with the dashboard and Jobs API on 127.0.0.1."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the cluster's processes are found through /proc")
    marker = uuid.uuid4().hex
    temp_dir = tempfile.mkdtemp(prefix="mjr-", dir="/tmp")  # short: Ray's socket paths live under it
    gcs, dashboard, client, agent, agent_grpc, node_manager, object_manager, env_agent, metrics = _free_ports(9)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update({
        MARKER_VAR: marker,
        "HF_TOKEN": SECRET,  # the cluster's environment, as a k8s Secret or `export` before `ray start` gives it
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # `mimi-tokenize`, `ray`
        "RAY_AUTH_MODE": "disabled",  # a throwaway cluster on 127.0.0.1; see the README for token auth
        "RAY_USAGE_STATS_ENABLED": "0",
    })
    command = ["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2",
               "--num-gpus=0", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
               f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
               f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
               f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    try:
        started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=90)
        if started.returncode != 0:
            pytest.fail(f"ray start failed ({started.returncode}):\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}")
        # its address went to its own temp dir, where a plain ray.init() elsewhere does not look
        assert str(gcs) in (Path(temp_dir) / "ray_current_cluster").read_text()
        default_address_file = Path("/tmp/ray/ray_current_cluster")
        assert not default_address_file.exists() or str(gcs) not in default_address_file.read_text()
        url = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 60
        while True:
            try:
                job_client = JobSubmissionClient(url)
                break
            except Exception:  # noqa: BLE001  (the dashboard may need a moment after `ray start` returns)
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        yield {"url": url, "client": job_client, "env": env, "temp_dir": Path(temp_dir)}
    finally:
        survivors = _kill_cluster(marker)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not survivors, f"Ray processes of the test cluster survived: {survivors}"


def wait_job(client: JobSubmissionClient, submission_id: str, timeout_s: float = JOB_TIMEOUT_S) -> str:
    """Poll until the job ends; return its logs; fail with them unless it SUCCEEDED."""
    deadline = time.time() + timeout_s
    while (status := client.get_job_status(submission_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                    JobStatus.STOPPED):
        if time.time() > deadline:
            client.stop_job(submission_id)
            pytest.fail(f"job {submission_id} still {status} after {timeout_s} s:\n"
                        f"{client.get_job_logs(submission_id)[-5000:]}")
        time.sleep(0.5)
    logs = client.get_job_logs(submission_id)
    assert status == JobStatus.SUCCEEDED, (
        f"job {submission_id} {status}: {client.get_job_info(submission_id).message}\n{logs[-5000:]}")
    return logs


def assert_no_secret(where: str, text: str | bytes) -> None:
    data = text if isinstance(text, bytes) else text.encode()
    assert SECRET.encode() not in data, f"the HF_TOKEN value leaked into {where}"


# --- data -------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """5 clips (WAV/FLAC, 16-44.1 kHz, mono/stereo): 3 shards of 2, 2 and 1 files."""
    root = tmp_path_factory.mktemp("corpus")
    for i, (fmt, sr, seconds, channels) in enumerate([("wav_pcm16", 16_000, 0.4, 1), ("flac", 44_100, 1.1, 2),
                                                      ("wav_float", 24_000, 0.7, 1), ("flac", 22_050, 0.9, 1),
                                                      ("wav_pcm16", 32_000, 1.3, 2)]):
        write_audio(root / f"clip{i}.{'flac' if fmt == 'flac' else 'wav'}", fmt, sr, seconds, channels, seed=i)
    return root


def reference_codes(corpus: Path, tiny_model_path: str) -> dict[str, np.ndarray]:
    """id → [F, K] codes of every clip, decoded by the pipeline's functions and encoded alone, here (no Ray)."""
    model = mimi.load_mimi(tiny_model_path)
    ref = {}
    for shard in discover_shards(str(corpus), files_per_shard=FILES_PER_SHARD):
        for clip in prepare_shard(shard)[0]:
            codes = model.encode(torch.from_numpy(clip.audio)[None, None], num_codebooks=NUM_CODEBOOKS)[0].numpy()
            ref[clip.clip_id] = codes.T.astype(np.int16)
    return ref


def read_rows(output: Path) -> dict[str, np.ndarray]:
    rows = {}
    for file in sorted((output / "data").glob("*.parquet")):
        table = pq.read_table(file)
        for i, clip_id in enumerate(table.column("id").to_pylist()):
            assert clip_id not in rows, f"duplicate row {clip_id}"
            rows[clip_id] = read_codes(table, i)
    return rows


def output_files(output: Path) -> dict[str, bytes]:
    """Every file of the output but the lock's (each run takes it with a new epoch and marks it released)."""
    return {str(p.relative_to(output)): p.read_bytes() for p in sorted(output.rglob("*"))
            if p.is_file() and not p.name.startswith((".lock.json", "lock.json"))}


# --- tests ------------------------------------------------------------------------------------------------------------


def test_workers_see_the_clusters_secrets_and_the_package(cluster):
    """jobs/preflight.py as a job: the HF_TOKEN of the cluster's environment reaches the workers (presence only)."""
    client = cluster["client"]
    job = client.submit_job(entrypoint=f"python {JOBS / 'preflight.py'} --require-env HF_TOKEN",
                            submission_id=f"preflight-{uuid.uuid4().hex[:8]}")
    logs = wait_job(client, job)
    assert '"HF_TOKEN": true' in logs and '"package": "0.1.0"' in logs and "1 node(s), OK" in logs
    assert_no_secret("the preflight job's logs", logs)


def test_run_as_a_job_then_resume(cluster, corpus, tiny_model_path, tmp_path_factory):
    """The Jobs API runs `mimi-tokenize run --ray-address auto` on the cluster: exact codes out; resubmitting the
    same command resumes (nothing redone, nothing duplicated, the manifest untouched); no secret anywhere."""
    client = cluster["client"]
    out = tmp_path_factory.mktemp("job-output") / "out"
    cluster["output"] = out
    # The package is installed (editable) in the cluster's Python, as in an image with it baked in (option (a) of
    # jobs/runtime_env.yaml): no working_dir needed; every path is absolute and on this machine.
    entrypoint = (f"mimi-tokenize run --input {corpus} --output {out} --model {tiny_model_path} "
                  f"--num-codebooks {NUM_CODEBOOKS} --files-per-shard {FILES_PER_SHARD} --ray-address auto")
    first = client.submit_job(entrypoint=entrypoint, submission_id=f"mimi-run-{uuid.uuid4().hex[:8]}")
    logs = wait_job(client, first)
    n = len(discover_shards(str(corpus), files_per_shard=FILES_PER_SHARD))
    assert f"{n} shard(s), 0 already done, {n} to encode" in logs
    assert "Connecting to existing Ray cluster" in logs  # joined the job's cluster, did not start its own

    final = manifest.read_manifest(str(out))
    assert final["status"] == "complete"
    assert (final["totals"]["shards"], final["totals"]["shards_done"], final["totals"]["clips"],
            final["totals"]["failed_clips"]) == (n, n, 5, 0)
    rows = read_rows(out)
    ref = reference_codes(corpus, tiny_model_path)
    assert sorted(rows) == sorted(ref) and len(rows) == 5
    for clip_id, codes in ref.items():
        np.testing.assert_array_equal(rows[clip_id], codes, err_msg=clip_id)

    before = output_files(out)
    second = client.submit_job(entrypoint=entrypoint, submission_id=f"mimi-run-{uuid.uuid4().hex[:8]}")
    resumed_logs = wait_job(client, second)
    assert f"{n} shard(s), {n} already done, 0 to encode" in resumed_logs
    assert output_files(out) == before  # same manifest, same Parquet files, nothing added
    assert read_rows(out).keys() == rows.keys()

    # the token: in no job log, job record, output file, or any log file of the cluster
    for job in (first, second):
        assert_no_secret(f"the logs of {job}", client.get_job_logs(job))
        assert_no_secret(f"the job record of {job}", repr(client.get_job_info(job)))
    for name, data in before.items():
        assert_no_secret(f"output file {name}", data)
    logs_dir = cluster["temp_dir"] / "session_latest" / "logs"
    for file in logs_dir.rglob("*"):
        if file.is_file():
            assert_no_secret(f"Ray log {file.name}", file.read_bytes())


def test_submit_script(cluster, corpus, tiny_model_path, tmp_path_factory):
    """jobs/submit.sh: uploads the repository with jobs/runtime_env.yaml, derives the submission id from the output
    URL, follows the job and exits with its outcome; a second submission for the output gets the next id."""
    out = cluster.get("output") or tmp_path_factory.mktemp("script-output") / "out"
    config = tmp_path_factory.mktemp("script-config") / "run.yaml"
    config.write_text(yaml.safe_dump({"input": str(corpus), "output": str(out), "model": tiny_model_path,
                                      "num_codebooks": NUM_CODEBOOKS, "files_per_shard": FILES_PER_SHARD}))
    env = {**cluster["env"], "RAY_ADDRESS": cluster["url"]}
    prefix = f"mimi-tokenize-{hashlib.sha256(str(out).encode()).hexdigest()[:12]}"

    def submit(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(JOBS / "submit.sh"), *args], env=env, cwd=tmp_path_factory.getbasetemp(),
                              capture_output=True, text=True, timeout=JOB_TIMEOUT_S)

    done = submit("--config", str(config))
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    assert f"submission id {prefix}-1" in done.stderr and f"job {prefix}-1 SUCCEEDED" in done.stderr
    assert "already done" in done.stdout  # the job's streamed logs (a resume when the previous test ran)
    client = cluster["client"]
    info = client.get_job_info(f"{prefix}-1")
    assert info.entrypoint == f"mimi-tokenize run --config {config} --ray-address auto"
    assert info.runtime_env["working_dir"].startswith("gcs://")  # the repository, uploaded
    assert_no_secret("the submit script's output", done.stdout + done.stderr)

    # what was uploaded: the code and the job files, not .git, tests or caches
    unpacked = [p for p in (cluster["temp_dir"] / "session_latest" / "runtime_resources" / "working_dir_files").glob(
        "*") if p.is_dir()]
    assert len(unpacked) == 1, unpacked
    top = {p.name for p in unpacked[0].iterdir()}
    assert {"pipeline", "mimi", "jobs", "configs", "pyproject.toml"} <= top
    assert not top & {".git", "tests", ".pytest_cache", "benchmarks"}, top
    assert not list(unpacked[0].rglob("__pycache__"))

    # a failing job: the script exits 1; its id is the output's next attempt
    failed = submit("--config", str(config), "--model", str(tmp_path_factory.getbasetemp() / "no-such-model"))
    assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr[-3000:]
    assert f"job {prefix}-2 FAILED" in failed.stderr
    assert re.search(r"mimi-tokenize run: error: .*no-such-model", failed.stdout)

    refused = submit("--config", str(config), "--ray-address", "auto")
    assert refused.returncode == 2 and "--ray-address auto" in refused.stderr


def test_runtime_env_file():
    runtime_env = yaml.safe_load((JOBS / "runtime_env.yaml").read_text())
    assert runtime_env["working_dir"] == "."
    assert {".git", "*.parquet", "*.safetensors", "tests"} <= set(runtime_env["excludes"])
    assert "env_vars" not in runtime_env  # secrets come from the cluster's environment, never from the job
    text = (JOBS / "runtime_env.yaml").read_text()
    assert not re.search(r"^\s*(HF_TOKEN|AWS_SECRET_ACCESS_KEY)\s*:", text, re.M)


def test_rayjob_manifest():
    docs = [d for d in yaml.safe_load_all((JOBS / "rayjob.yaml").read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    job = by_kind["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("mimi-tokenize run --config /configs/run.yaml")
    assert "--ray-address auto" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] == 3
    assert spec["submissionMode"] == "K8sJobMode"
    cluster_spec = spec["rayClusterSpec"]
    head = cluster_spec["headGroupSpec"]["template"]["spec"]
    workers = cluster_spec["workerGroupSpecs"]
    gpu_group = next(g for g in workers if g["template"]["spec"]["containers"][0]["resources"]["limits"].get(
        "nvidia.com/gpu"))
    assert str(gpu_group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert gpu_group["replicas"] >= 1

    secret_names = set()
    for pod in [head] + [g["template"]["spec"] for g in workers]:
        container = pod["containers"][0]
        refs = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
        refs += [e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", []) if "valueFrom" in e]
        assert refs, f"pod {container['name']} gets no secret from the environment"
        secret_names |= set(refs)
        assert not any(e.get("name") == "HF_TOKEN" and "value" in e for e in container.get("env", []))
    head_container = head["containers"][0]
    mount = next(m for m in head_container["volumeMounts"] if m["mountPath"] == "/configs")
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    config_map = by_kind["ConfigMap"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    run_config = yaml.safe_load(config_map["data"]["run.yaml"])
    assert run_config["output"] and run_config["input"]
    assert not {k for k in run_config if re.search("token|secret|key", k, re.I)}
    assert "ray_address" not in run_config or run_config["ray_address"] == "auto"
    assert secret_names  # and the Secret itself is not in the file: it is created out of band
    assert "Secret" not in by_kind
    assert "runtimeEnvYAML" not in spec or "HF_TOKEN" not in spec["runtimeEnvYAML"]
