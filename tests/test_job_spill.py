"""A table larger than the object store: Ray spills objects to disk and the job's output is the same.

The job runs in a subprocess (tests/_spill_job.py) on its own local Ray with a 76 MiB object store,
so that the session's Ray instance keeps its own.
"""

from __future__ import annotations

import numpy as np
import pytest
from _job_fixtures import read_levels, run_result_script

STORE_BYTES = 76 * 2**20  # Ray's smallest object store is 75 MiB
ROWS, DIM = 100_000, 256  # 98 MiB of float32 embeddings, 1.3x the store


@pytest.mark.slow
def test_table_larger_than_the_object_store_spills(tmp_path):
    from agc_ray import HiLander
    from agc_ray.core.synthetic import make_faces
    from agc_ray.distributed.demo import write_table

    x, y = make_faces(ROWS, dim=DIM, seed=2)
    assert x.nbytes > 1.2 * STORE_BYTES
    table = write_table(tmp_path / "table", x, y, files=4)
    result, proc = run_result_script("_spill_job.py", table, tmp_path / "out", tmp_path / "spill", STORE_BYTES)
    assert "Warning: " not in proc.stderr, proc.stderr[-3000:]  # e.g. torch's on read-only object-store arrays
    assert result["store_bytes"] <= STORE_BYTES  # the store really was the small one
    assert result["spilled_mib"] > 0  # objects went to disk instead of failing the job
    ref = HiLander(unsupervised=True, tau=0.5, levels=2).predict_hierarchy(x)
    got = read_levels(tmp_path / "out")
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)
