"""``ray job submit --working-dir . -- python jobs/cluster.py ...`` against a ``ray start --head`` cluster
that this test starts on its own ports and temp dir, and stops by its own process ids."""

from __future__ import annotations

import json
import os
import shutil
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from _job_fixtures import free_port, job_data, job_model, job_table, read_levels, reference_levels  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))

#: A line that a quiet run does not print: a logger's WARNING and above (Python's or Ray's C++ "[... W ...]")
#: or a Python warning.
LOUD = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|^\[[^]]* [WE] \d+ \d+\]|\b\w*Warning: ")


def _own_processes(temp_dir: str, gcs_port: int):
    """Processes of the cluster rooted in ``temp_dir``: those naming it or its GCS address (the Ray client
    server that `ray start` detaches names only that), and all their descendants."""
    import psutil

    address = f":{gcs_port}"
    roots = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or ()
            if any(temp_dir in part or (part.startswith("--address=") and part.endswith(address)) for part in cmdline):
                roots.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found = {p.pid: p for p in roots}
    for p in roots:
        try:
            for child in p.children(recursive=True):
                found.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def _stop_cluster(temp_dir: str, gcs_port: int):
    import psutil

    procs = _own_processes(temp_dir, gcs_port)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    # stopped all at once, the GCS, the raylet, the autoscaler monitor and the runtime-env agent were
    # still running 10 s after SIGTERM (then killed): kill what is left after 3 s
    _, alive = psutil.wait_procs(procs, timeout=3)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def head_cluster():
    """A one-node cluster from ``ray start --head`` (auth disabled), its dashboard address and env."""
    temp_dir = tempfile.mkdtemp(prefix="agcray", dir="/tmp")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    dash, gcs = free_port(), free_port()
    ports = [
        "--port", str(gcs), "--dashboard-port", str(dash), "--node-manager-port", str(free_port()),
        "--object-manager-port", str(free_port()), "--ray-client-server-port", str(free_port()),
        "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
        "--min-worker-port", "23000", "--max-worker-port", "23999",
    ]
    cmd = [RAY, "start", "--head", "--num-cpus", "2", "--temp-dir", temp_dir, "--include-dashboard", "true",
           "--dashboard-host", "127.0.0.1", "--disable-usage-stats", *ports]
    try:
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, timeout=180)
        yield f"http://127.0.0.1:{dash}", env
    finally:
        _stop_cluster(temp_dir, gcs)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit(head_cluster, job_table, job_model, job_data, tmp_path):
    address, env = head_cluster
    out = tmp_path / "out"
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--",
           "python", "jobs/cluster.py", "--input", str(job_table), "--output", str(out), "--model", str(job_model),
           "--knn", "exact", "--num-shards", "2", "--max-levels", "2"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "clustered 2500 rows" in proc.stdout
    # a run that succeeds logs nothing at WARNING or above (ours, Ray's Python or C++ loggers, faiss's)
    # and no Python warning (UserWarning, DeprecationWarning, ... printed by a worker);
    # the job's own lines follow the CLI's "Tailing logs" (the CLI's packaging notes come before)
    job_lines = proc.stdout.split("Tailing logs until the job exits", 1)[-1].splitlines()
    loud = [line for line in job_lines if LOUD.search(line)]
    assert not loud, loud
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "succeeded"
    ref = reference_levels(job_model, job_data[0], knn="exact", levels=2)
    for a, b in zip(read_levels(out), ref):
        np.testing.assert_array_equal(a, b)
    # new rows join that output through jobs/assign.py, submitted the same way, just as quietly
    from agc_ray.distributed.demo import write_table

    write_table(tmp_path / "new", job_data[0][:20] * 1.01, ids=np.arange(20) + 10**9, files=1)
    inc = tmp_path / "inc"
    proc = subprocess.run([RAY, "job", "submit", "--address", address, "--working-dir", ".", "--", "python",
                           "jobs/assign.py", "--base", str(out), "--input", str(tmp_path / "new"), "--output", str(inc)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "assigned 20 new rows" in proc.stdout
    job_lines = proc.stdout.split("Tailing logs until the job exits", 1)[-1].splitlines()
    loud = [line for line in job_lines if LOUD.search(line)]
    assert not loud, loud
    # scaled copies of base rows are the same directions: they join those rows' clusters
    got = read_levels(inc, np.concatenate([np.arange(len(job_data[0])), np.arange(20) + 10**9]))
    for level in got:
        np.testing.assert_array_equal(level[len(job_data[0]):], level[:20])
    # a failing entrypoint (bad input: exit code 2) makes `ray job submit` fail
    bad = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--", "python", "jobs/cluster.py",
         "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o2"), "--unsupervised"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert bad.returncode != 0
    assert "input path not found" in bad.stdout + bad.stderr
    print(f"ray job submit round trip: {time.time() - t0:.0f}s")


def test_ray_job_submit_train(head_cluster, job_table, job_data, tmp_path):
    """The training job through `ray job submit`; its model dir clusters through jobs/cluster.py."""
    address, env = head_cluster
    model = tmp_path / "model"
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--",
           "python", "jobs/train.py", "--input", str(job_table), "--output", str(model), "--num-workers", "1",
           "--cpus-per-worker", "0.5", "--epochs", "2", "--batch-size", "256", "--k", "5", "--train-levels", "2",
           "--hidden-channels", "32", "--edge-channels", "32", "--storage-path", str(tmp_path / "ckpt")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    config = json.loads((model / "config.json").read_text())
    assert config["training"]["epochs"] == 2 and config["training"]["num_workers"] == 1
    assert len(config["training"]["history"]) == 2
    from agc_ray import HiLander

    labels = HiLander.load(model).set_params(knn="exact").predict(job_data[0])
    assert labels.shape == (len(job_data[0]),) and 1 < labels.max() + 1 < len(job_data[0])
