"""Shared fixtures of the distributed-job tests: one local Ray session, a saved model, Parquet tables.

Import the fixtures into a test module (``from _job_fixtures import ...``): pytest then shares the
session-scoped ones across modules.
"""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Keep up to 12 idle workers per node instead of Ray's default of one per logical CPU (4 here). The
# tests run Ray Data reads, jobs, training workers and assignment runs one after another in one
# session, so with the default the raylet kills the extra workers a second after each and the next
# starts new ones, each importing torch, faiss and agc_ray again (seconds of CPU per worker). Ray reads
# RAY_<config> variables in every process it starts: ray.init here, `ray start` and the CLI
# subprocesses of the tests inherit it. Only how long idle processes live changes, not what runs.
os.environ.setdefault("RAY_num_workers_soft_limit", "12")

N_ROWS = 2500


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1, with the AWS environment variables pointing at it.

    Started before Ray so that Ray's workers inherit the variables.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env["AWS_ENDPOINT_URL"]
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_session(s3_endpoint):
    """One private local Ray instance for the whole test session (more logical CPUs than cores)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
        ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray


@pytest.fixture(scope="session")
def job_data():
    """A labelled test table of other identities (x, y), N_ROWS rows."""
    from agc_ray.core.synthetic import make_faces

    return make_faces(N_ROWS, seed=2)


@pytest.fixture(scope="session")
def job_model(tmp_path_factory):
    """A small model trained once (the default 6 epochs of 2000 rows, a few seconds), saved; returns its
    directory."""
    from agc_ray import HiLander
    from agc_ray.core.synthetic import make_faces

    x, y = make_faces(2000, seed=1)
    path = tmp_path_factory.mktemp("model")
    # 4 epochs left level 0's scores of exact duplicates below tau 0.9 (copies of base rows then stayed
    # apart from them in jobs/assign.py's tests)
    HiLander(seed=0).fit(x, y).save(path)
    return path


@pytest.fixture(scope="session")
def job_table(tmp_path_factory, job_data):
    """The test table as 3 Parquet files (id, fixed-size-list embedding, label)."""
    from agc_ray.distributed.demo import write_table

    x, y = job_data
    return write_table(tmp_path_factory.mktemp("table"), x, y, files=3)


def run_result_script(script, *args, **env) -> tuple[dict, "subprocess.CompletedProcess"]:
    """Run a helper script of tests/ (its own Ray: no RAY_ADDRESS, auth and usage stats off, ``env``
    added) that prints its outcome as JSON on a line "RESULT ..."; assert it exited 0 with such a
    line and no "error" in it; return ``(result, completed process)``."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    environ = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", **env)
    environ.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parent / script), *map(str, args)],
                          env=environ, capture_output=True, text=True, timeout=540)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert "error" not in result, result
    return result, proc


def reference_levels(model_dir, x, **params) -> list[np.ndarray]:
    """Single-process ``HiLander.predict_hierarchy`` of the saved model (params override)."""
    from agc_ray import HiLander

    est = HiLander.load(model_dir)
    est.set_params(**params)
    return est.predict_hierarchy(x)


def read_levels(output, ids=None) -> list[np.ndarray]:
    """Every level's cluster_id of an output, in the order of ``ids`` (default: sorted ids)."""
    import pyarrow.dataset as pds

    ds = pds.dataset(str(output) + "/assignments", format="parquet", partitioning="hive")
    table = ds.to_table()
    levels = sorted(set(table.column("level").to_pylist()))
    out = []
    for level in levels:
        part = table.filter(pds.field("level") == level)
        order = np.argsort(part.column("id").to_numpy(zero_copy_only=False), kind="stable")
        lab = part.column("cluster_id").to_numpy()[order]
        if ids is not None:
            pos = np.argsort(np.argsort(np.asarray(ids), kind="stable"), kind="stable")
            lab = lab[pos]
        out.append(lab)
    return out
