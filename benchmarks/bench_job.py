"""Benchmark: the distributed job on local Ray vs single-process ``HiLander`` on the same table.

    python benchmarks/bench_job.py --n 100000
    python benchmarks/bench_job.py --n 1000000 --model my_model     # reuse a saved model
    python benchmarks/bench_job.py --n 1000000 --repeat 3            # median ratios of 3 alternated pairs

Steps: a synthetic n x 256 table (make_faces, seed 2) written as Parquet; a model trained on another
split (or --model); then, each in its own child process so that memory is measured separately,
(1) ``HiLander.predict_hierarchy`` in one process and (2) the job (``run_job``) on a local Ray instance.
Reported: wall time per stage, peak memory (PSS summed over the child's process tree, Ray's workers
and object store included), the job / single-process ratio, whether every level's partition is
identical, and Fp / Fb / NMI per level. JSON goes to benchmarks/results/job_<n>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tree_pss(pid: int) -> dict[str, dict[str, int]]:
    """PSS (bytes) of a process and each of its descendants by process title (RSS where PSS is
    unavailable), split into heap ("anon"), shared memory ("shmem": Ray's object store) and mapped files
    ("file": libraries): Ray names its workers after what they run (``ray::ShardIndexActor``,
    ``ray::IDLE``)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    by_title: dict[str, dict[str, int]] = {}
    for p in procs:
        try:
            cmdline = p.cmdline()
            title = cmdline[0].split()[0] if cmdline and cmdline[0].strip() else p.name()
            title = title if title.startswith("ray::") else os.path.basename(title)
            parts = _pss(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, FileNotFoundError, ProcessLookupError):
            continue
        total = by_title.setdefault(title, {})
        for key, value in parts.items():
            total[key] = total.get(key, 0) + value
    return by_title


def _pss(p) -> dict[str, int]:
    """A process's PSS and its anon / shmem / file parts from /proc/PID/smaps_rollup (cheap: psutil's
    full smaps walk costs a core when sampled often), else psutil's (RSS where PSS is unavailable)."""
    fields = {"Pss:": "pss", "Pss_Anon:": "anon", "Pss_Shmem:": "shmem", "Pss_File:": "file"}
    try:
        with open(f"/proc/{p.pid}/smaps_rollup") as f:
            out = {fields[line.split()[0]]: int(line.split()[1]) * 1024 for line in f if line.split()[0] in fields}
        if "pss" in out:
            return out
    except (FileNotFoundError, PermissionError):
        pass
    info = p.memory_full_info()
    return {"pss": getattr(info, "pss", info.rss)}


def _totals(by_title: dict[str, dict[str, int]]) -> dict[str, int]:
    """:func:`_tree_pss`'s parts summed over the processes."""
    out: dict[str, int] = {}
    for parts in by_title.values():
        for key, value in parts.items():
            out[key] = out.get(key, 0) + value
    return out


def _machine_shmem() -> int:
    """Shared memory in use on the machine (bytes): /proc/meminfo's Shmem (0 where unavailable)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Shmem:"))
    except (OSError, StopIteration):
        return 0


#: The sampler waits at least this many times a sample's own duration before the next (<= 5 % of a core).
SAMPLER_SHARE_INVERSE = 20


class PeakPss:
    """``with PeakPss(pid) as peak:`` samples the PSS of ``pid``'s process tree every ``every`` seconds in a
    thread; ``peak.bytes`` is the largest sample once the block ends, ``peak.by_title`` that sample's
    PSS parts per process title (where the memory was)."""

    def __init__(self, pid: int, every: float = 1.0):
        self.pid, self.every, self.bytes, self.by_title = pid, every, 0, {}
        # (unix time, PSS, heap, shmem, the machine's Shmem) of every sample, bytes. The object store's
        # freed pages stay in shared memory until Ray reuses them; they leave the tree's PSS when the
        # workers that mapped them exit, not the machine's Shmem.
        self.series: list[tuple] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._done.is_set():
            t0 = time.perf_counter()
            by_title = _tree_pss(self.pid)
            totals = _totals(by_title)
            total = totals.get("pss", 0)
            self.series.append((round(time.time(), 1), total, totals.get("anon", 0), totals.get("shmem", 0),
                                _machine_shmem()))
            if total > self.bytes:
                self.bytes, self.by_title = total, by_title
            # a sample reads every process's smaps_rollup, whose cost grows with the memory mapped: at 10M
            # rows a sample each 0.5 s took 31 % of a core of this 2-core machine; at most 5 % now
            self._done.wait(max(self.every, SAMPLER_SHARE_INVERSE * (time.perf_counter() - t0)))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()

    def breakdown_gb(self) -> dict:
        """At the peak: the PSS parts summed over the tree, and each title's PSS and heap, in GB."""
        gb = lambda b: round(b / 2**30, 3)  # noqa: E731
        titles = sorted(self.by_title.items(), key=lambda kv: -kv[1]["pss"])
        return {"total": {k: gb(v) for k, v in _totals(self.by_title).items()},
                "by_process": {t: {k: gb(v) for k, v in by.items()} for t, by in titles}}


def run_child(args: list[str]) -> dict:
    """Run this script in a child role; sample its process tree's memory; return its JSON and peak."""
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    with PeakPss(proc.pid) as peak:
        out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"child {args[:2]} failed with exit code {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_memory_gb"] = peak.bytes / 2**30
    result["peak_memory_breakdown_gb"] = peak.breakdown_gb()
    result["memory_series"] = {"columns": ["unix_time", "pss", "anon", "shmem", "machine_shmem"],
                               "rows": peak.series}
    return result


def role_single(work: Path, knn: str) -> dict:
    import numpy as np

    from agc_ray import HiLander

    x = np.load(work / "x.npy", mmap_mode="r")
    est = HiLander.load(work / "model")
    est.set_params(knn=knn)
    t0 = time.perf_counter()
    result = est.hierarchy(np.asarray(x))
    wall = time.perf_counter() - t0
    np.save(work / "single_levels.npy", np.stack(result.levels))
    stages = {"knn_seconds": sum(s.get("knn_seconds", 0.0) for s in result.stats),
              "inference_seconds": sum(s.get("inference_seconds", 0.0) for s in result.stats)}
    stages["decode_aggregate_seconds"] = wall - stages["knn_seconds"] - stages["inference_seconds"]
    return {"wall_seconds": wall, "stages": stages, "levels": result.stats}


def role_job(work: Path, knn: str, num_cpus: int, num_shards: int) -> dict:
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # as jobs/cluster.py: chosen, not Ray's WARNING-level default
    import numpy as np
    import ray

    from agc_ray.distributed.job import JobConfig, run_job

    from agc_ray.distributed import logs

    logs.configure()  # the job's stage lines on stderr
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING")
    init_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    manifest = run_job(JobConfig(input=str(work / "table"), output=str(work / "job_out"), model=str(work / "model"),
                                 knn=knn, num_shards=num_shards, overwrite=True))
    wall = time.perf_counter() - t0
    import pyarrow.dataset as pds

    ds = pds.dataset(str(work / "job_out" / "assignments"), format="parquet", partitioning="hive").to_table()
    levels = []
    for level in range(len(manifest["levels"])):
        part = ds.filter(pds.field("level") == level)
        order = np.argsort(part.column("id").to_numpy())
        levels.append(part.column("cluster_id").to_numpy()[order])
    np.save(work / "job_levels.npy", np.stack(levels))
    ray.shutdown()
    return {"wall_seconds": wall, "ray_init_seconds": init_seconds, "stages": manifest["timings"],
            "levels": manifest["levels"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="rows of the clustered table (default: %(default)s)")
    p.add_argument("--train-rows", type=int, default=50_000, help="rows of the training split")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--model", help="reuse a saved model directory instead of training one")
    p.add_argument("--knn", default="auto", choices=("auto", "exact", "ivf"))
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--num-shards", type=int, default=0, help="node shards (0: one per CPU)")
    p.add_argument("--work", default=None, help="scratch directory (default: agc_output/bench_job_<n>)")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the single process and the job this many times, alternated, and report the median "
                        "ratios (this machine's speed drifts by 10-20 %% over minutes: one pair is one sample)")
    p.add_argument("--reuse-single", action="store_true",
                   help="take the single-process run from the last results of this --n and --work (the job's "
                        "side only is run again)")
    p.add_argument("--role", choices=("single", "job"), help=argparse.SUPPRESS)
    args = p.parse_args()
    work = Path(args.work or ROOT / "agc_output" / f"bench_job_{args.n}")
    if args.role == "single":
        print(json.dumps(role_single(work, args.knn), default=float))
        return
    if args.role == "job":
        print(json.dumps(role_job(work, args.knn, args.num_cpus, args.num_shards), default=float))
        return

    import numpy as np

    from agc_ray import HiLander
    from agc_ray.core.synthetic import make_faces
    from agc_ray.distributed.demo import write_table
    from agc_ray.metrics import evaluate

    out = ROOT / "benchmarks" / "results" / f"job_{args.n}.json"
    work.mkdir(parents=True, exist_ok=True)
    common = ["--n", str(args.n), "--work", str(work), "--knn", args.knn]
    if args.reuse_single:  # same table, model and single-process run as last time
        last = json.loads(out.read_text())
        y = np.load(work / "y.npy")
        prep, train, single = last["prepare_seconds"], last["train_seconds"], last["single"]
    else:
        t0 = time.perf_counter()
        x, y = make_faces(args.n, seed=2)
        np.save(work / "x.npy", x)
        np.save(work / "y.npy", y)  # the labels, for --reuse-single
        write_table(work / "table", x, y, files=16)
        del x
        prep = time.perf_counter() - t0
        t0 = time.perf_counter()
        if args.model:
            HiLander.load(args.model).save(work / "model")
        else:
            xt, yt = make_faces(args.train_rows, seed=1)
            HiLander(epochs=args.epochs).fit(xt, yt).save(work / "model")
        train = time.perf_counter() - t0
    pairs = []  # per repeat: (single, job, identical partitions)
    for rep in range(max(1, args.repeat)):
        if rep > 0 or not args.reuse_single:
            single = run_child([*common, "--role", "single"])
        job = run_child([*common, "--role", "job", "--num-cpus", str(args.num_cpus), "--num-shards",
                         str(args.num_shards)])
        a, b = np.load(work / "single_levels.npy"), np.load(work / "job_levels.npy")
        pairs.append((single, job, a.shape == b.shape and bool((a == b).all())))
    identical = all(same for _, _, same in pairs)
    repeats = [{"single_wall_seconds": s_["wall_seconds"], "job_wall_seconds": j["wall_seconds"],
                "single_peak_memory_gb": s_["peak_memory_gb"], "job_peak_memory_gb": j["peak_memory_gb"],
                "time_ratio": j["wall_seconds"] / s_["wall_seconds"],
                "memory_ratio": j["peak_memory_gb"] / max(s_["peak_memory_gb"], 1e-9), "identical_partitions": same}
               for s_, j, same in pairs]
    metrics = {"single": [evaluate(y, lv) for lv in a], "job": [evaluate(y, lv) for lv in b]}
    result = {
        "n": args.n, "knn": args.knn, "num_cpus": args.num_cpus, "prepare_seconds": prep, "train_seconds": train,
        "single": single, "job": job, "identical_partitions": identical,
        # the median over the repeats (one repeat: that pair's)
        "time_ratio_job_over_single": float(np.median([r["time_ratio"] for r in repeats])),
        "memory_ratio_job_over_single": float(np.median([r["memory_ratio"] for r in repeats])),
        "repeats": repeats, "metrics": metrics,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float))
    print(f"\n{args.n} rows, knn={args.knn}, {args.num_cpus} CPUs")
    print(f"{'':>8} {'wall s':>8} {'peak GB':>8}  stages")
    for name, r in (("single", single), ("job", job)):
        stages = " ".join(f"{k.replace('_seconds', '')}={v:.1f}" for k, v in r["stages"].items())
        print(f"{name:>8} {r['wall_seconds']:>8.1f} {r['peak_memory_gb']:>8.2f}  {stages}")
        at_peak = r.get("peak_memory_breakdown_gb", {"total": {}, "by_process": {}})
        print(f"{'':>8} at the peak (GB): " + ", ".join(f"{k} {v:.2f}" for k, v in at_peak["total"].items()))
        print(f"{'':>8}   by process (PSS / heap): " + ", ".join(
            f"{t} {v['pss']:.2f} / {v.get('anon', 0):.2f}" for t, v in list(at_peak["by_process"].items())[:8]))
    if len(repeats) > 1:
        for i, r in enumerate(repeats):
            print(f"repeat {i}: single {r['single_wall_seconds']:.1f} s / {r['single_peak_memory_gb']:.2f} GB, job "
                  f"{r['job_wall_seconds']:.1f} s / {r['job_peak_memory_gb']:.2f} GB: time {r['time_ratio']:.2f}x, "
                  f"memory {r['memory_ratio']:.2f}x")
    median = " (median of %d)" % len(repeats) if len(repeats) > 1 else ""
    print(f"job / single{median}: time {result['time_ratio_job_over_single']:.2f}x, memory "
          f"{result['memory_ratio_job_over_single']:.2f}x; identical partitions: {identical}")
    for lv, (ms, mj) in enumerate(zip(metrics["single"], metrics["job"])):
        print(f"level {lv}: single Fp {ms['fp']:.3f} clusters {ms['n_clusters']}, job Fp {mj['fp']:.3f} "
              f"clusters {mj['n_clusters']}")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
