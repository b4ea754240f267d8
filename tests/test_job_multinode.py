"""Worker nodes removed mid-job (``ray.cluster_utils.Cluster``): the output is still identical.

The cluster runs in a subprocess (tests/_multinode_job.py) so that it does not disturb the session's
local Ray instance.
"""

from __future__ import annotations

import numpy as np
import pytest
from _job_fixtures import job_data, job_model, job_table, read_levels, reference_levels, run_result_script  # noqa: F401

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
    result, _ = run_result_script("_multinode_job.py", job_table, out, job_model, *TRIGGERS,
                                  AGC_RAY_DIRECT_READ_BYTES="0")
    assert result["removed"] == TRIGGERS and result["nodes_alive"] == 3  # the head and two fresh workers
    ref = reference_levels(job_model, job_data[0], knn="exact", levels=2)
    got = read_levels(out)
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)
