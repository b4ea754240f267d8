"""Helper script of test_job_spill.py: run the job on a private local Ray whose object store is far
smaller than the table, with object spilling to SPILL_DIR. Usage: python _spill_job.py INPUT OUTPUT
SPILL_DIR STORE_BYTES. Prints the manifest and the bytes Ray spilled as JSON on a line "RESULT ..."."""

from __future__ import annotations

import json
import logging
import os
import re
import sys

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")


def spilled_mib() -> float:
    """MiB spilled so far, from Ray's memory summary (the line ``Spilled N MiB, M objects``)."""
    import ray
    from ray._private.internal_api import memory_summary

    summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    found = re.search(r"Spilled (\d+) MiB", summary)
    return float(found.group(1)) if found else 0.0


def main(input_, output, spill_dir, store_bytes):
    import ray

    from agc_ray.distributed.job import JobConfig, run_job

    spilling = {"type": "filesystem", "params": {"directory_path": spill_dir}}
    ray.init(address="local", num_cpus=2, object_store_memory=int(store_bytes), include_dashboard=False,
             logging_level=logging.WARNING, _system_config={"object_spilling_config": json.dumps(spilling)})
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        result = {}
        try:
            result["manifest"] = run_job(JobConfig(input=input_, output=output, unsupervised=True, tau=0.5,
                                                   num_shards=2, max_levels=2))
        except BaseException as e:  # reported to the test
            result["error"] = repr(e)
        result["spilled_mib"] = spilled_mib()
        result["store_bytes"] = ray.cluster_resources().get("object_store_memory")
        print("RESULT " + json.dumps(result, default=str))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:5])
