"""Helper script of test_job_multinode.py: run the job on a 3-node ``ray.cluster_utils.Cluster`` and
remove a worker node as soon as the job logs a line containing TRIGGER (default "level 0 kNN": the
kNN graph is done, its scoring tasks and index actors are then running; "read + validate": the
index actors are being built and searched). Usage: python _multinode_job.py INPUT OUTPUT MODEL [TRIGGER].
Prints the manifest as JSON."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")


class _Trigger(logging.Handler):
    def __init__(self, event, text):
        super().__init__()
        self.event, self.text = event, text

    def emit(self, record):
        if self.text in record.getMessage():
            self.event.set()


def main(input_, output, model, trigger="level 0 kNN"):
    import ray
    from ray.cluster_utils import Cluster

    from agc_ray.distributed.job import JobConfig, run_job

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    cluster.add_node(num_cpus=2)
    victim = cluster.add_node(num_cpus=2)
    try:
        ray.init(address=cluster.address, logging_level="WARNING")
        cluster.wait_for_nodes()
        ray.data.DataContext.get_current().enable_progress_bars = False
        event = threading.Event()
        logging.getLogger("agc_ray").addHandler(_Trigger(event, trigger))
        shown = logging.StreamHandler(sys.stderr)  # the job's stage lines, for a failing test's output
        shown.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        logging.getLogger("agc_ray").addHandler(shown)
        logging.getLogger("agc_ray").setLevel(logging.INFO)
        result = {}

        def run():
            try:
                result["manifest"] = run_job(JobConfig(input=input_, output=output, model=model, knn="exact",
                                                       num_shards=4, max_levels=2))
            except BaseException as e:  # reported below
                result["error"] = repr(e)
                event.set()

        thread = threading.Thread(target=run)
        thread.start()
        event.wait(timeout=200)
        removed = "error" not in result
        if removed:
            print(f"{time.strftime('%H:%M:%S')} removing a worker node", file=sys.stderr, flush=True)
            cluster.remove_node(victim)
        thread.join(timeout=300)
        out = {"removed": removed, "nodes_alive": sum(n["Alive"] for n in ray.nodes())} | result
        print("RESULT " + json.dumps(out, default=str))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:5])
