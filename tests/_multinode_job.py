"""Helper script of test_job_multinode.py: run the job on a 3-node ``ray.cluster_utils.Cluster`` and
remove its oldest worker node as soon as the job logs a line containing each TRIGGER in turn, a fresh
worker node joining after each removal (so that the job has two workers again).
Triggers: "read + validate" (the index actors are being built and searched), "level 0 kNN" (the kNN
graph is done, its scoring tasks run). Usage: python _multinode_job.py INPUT OUTPUT MODEL TRIGGER...
Prints the manifest, the removals done and the nodes alive as JSON."""

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
    """Sets the event of each trigger text when a log line contains it."""

    def __init__(self, events: dict):
        super().__init__()
        self.events = events

    def emit(self, record):
        for text, event in self.events.items():
            if text in record.getMessage():
                event.set()


def main(input_, output, model, *triggers):
    import ray
    from ray.cluster_utils import Cluster

    from agc_ray.distributed.job import JobConfig, run_job

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=2), cluster.add_node(num_cpus=2)]
    try:
        ray.init(address=cluster.address, logging_level="WARNING")
        cluster.wait_for_nodes()
        ray.data.DataContext.get_current().enable_progress_bars = False
        events = {text: threading.Event() for text in triggers}
        logging.getLogger("agc_ray").addHandler(_Trigger(events))
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
                for event in events.values():
                    event.set()

        thread = threading.Thread(target=run)
        thread.start()
        removed = []
        for text in triggers:
            events[text].wait(timeout=200)
            if "error" in result or not thread.is_alive():
                break
            print(f"{time.strftime('%H:%M:%S')} removing a worker node ({text})", file=sys.stderr, flush=True)
            cluster.remove_node(workers.pop(0))  # the oldest worker: it holds most of the objects
            removed.append(text)
            workers.append(cluster.add_node(num_cpus=2))
        thread.join(timeout=300)
        out = {"removed": removed, "nodes_alive": sum(n["Alive"] for n in ray.nodes())} | result
        print("RESULT " + json.dumps(out, default=str))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
