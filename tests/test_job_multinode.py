"""Worker nodes removed mid-job (``ray.cluster_utils.Cluster``): the output is still identical.

The cluster runs in a subprocess (tests/_multinode_job.py) so that it does not disturb the session's
local Ray instance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _job_fixtures import job_data, job_model, job_table, read_levels, reference_levels  # noqa: F401

HERE = Path(__file__).resolve().parent


TRIGGERS = ["read + validate", "level 0 kNN"]  # during the kNN search, then during scoring


@pytest.mark.slow
def test_nodes_removed_mid_job(job_table, job_model, job_data, tmp_path):
    """The head holds no CPU (as in cluster_configs/), so every task and object is on the two workers;
    one of them is removed while the index actors build and search (the job logs "read + validate"),
    a fresh node joins, and the other original one is removed while level 0 is scored ("level 0 kNN"):
    one run for both stages (a cluster start is most of a run). Lost objects (row shards, node features,
    projections, index actors) are rebuilt by Ray from their lineage: this hung while tasks fetched
    other shards' parts with ray.get (they held every CPU that the rebuilding tasks needed)."""
    out = tmp_path / "out"
    # the table read by Ray Data tasks on the workers (lineage), not by the driver (see DIRECT_READ_BYTES)
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", AGC_RAY_DIRECT_READ_BYTES="0")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(HERE / "_multinode_job.py"), str(job_table), str(out), str(job_model),
                           *TRIGGERS], env=env, capture_output=True, text=True, timeout=540)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert "error" not in result, result
    assert result["removed"] == TRIGGERS and result["nodes_alive"] == 3  # the head and two fresh workers
    ref = reference_levels(job_model, job_data[0], knn="exact", levels=2)
    got = read_levels(out)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)
