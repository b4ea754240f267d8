"""Soak: scheduled in-place runs of ``jobs/cluster.py`` on a changing table, some killed with SIGKILL.

First, ``--overlaps`` trials of two runs on two tables started one second apart with one ``--output``
(fresh, then both with ``--overwrite``): exactly one exits 0, the other 2 naming the winner.

Each run clusters the table of the day with ``--previous OUT --output OUT --overwrite`` (the
documented nightly set-up) against one long-lived local Ray cluster, as ``ray job submit`` would. Between
runs the table changes by a few percent: rows removed, rows of new identities added, rows moved to
another identity. ``--kills`` of the runs are killed (``kill -9`` of the driver), ``--commit-kills`` of
them as soon as their commit starts and the others at a random moment of their expected duration, and
then rerun, which must recover. After every successful run:

- nothing beside the output (no ``.OUT.staging-*``, no ``.OUT.old-*``) and no ``_COMMITTING`` marker;
- the manifest is readable, succeeded, names a new run id and chains to the previous run's id;
- ``next_cluster_ids`` never decrease and the level-0 counter grows (new identities arrive every run);
- ids stable: at least 90 % of level-0 clusters kept and at least 90 % of the unchanged rows keep their
  level-0 id (the promise that README makes for 5 % new rows);
- output size bounded: bytes per row within 1.5x of the first run's (nothing accumulates).

    python benchmarks/soak_scheduled.py                       # 20 runs, 5 kills, local output
    python benchmarks/soak_scheduled.py --store s3            # output on moto's S3 server (127.0.0.1)
    python benchmarks/soak_scheduled.py --runs 0 --overlaps 3 # only the overlapping pairs

Prints one line per run and writes JSON (``--json``). Exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Store:
    """Where the output lives: a local directory or a prefix on moto's S3 server."""

    def __init__(self, kind: str, work: Path):
        import pyarrow.fs as pafs

        self.kind = kind
        self.env = {}
        if kind == "local":
            self.fs, self.path, self.uri = pafs.LocalFileSystem(), str(work / "out"), str(work / "out")
            return
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request lines

        port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server.start()
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                    "AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        os.environ.update(self.env)
        import boto3

        boto3.client("s3").create_bucket(Bucket="soak")
        self.fs, _ = pafs.FileSystem.from_uri("s3://soak")
        self.path, self.uri = "soak/nightly/out", "s3://soak/nightly/out"

    def leftovers(self) -> list[str]:
        """Anything beside the output that a run left (staging, old copies, commit marker)."""
        import posixpath

        import pyarrow.fs as pafs

        parent, name = posixpath.split(self.path)
        infos = self.fs.get_file_info(pafs.FileSelector(parent, recursive=True, allow_not_found=True))
        return sorted({i.path for i in infos if f".{name}." in i.path or i.path.endswith("_COMMITTING")})

    def committing(self) -> bool:
        """A run is committing: its staged manifest is written (local) or its commit marker exists (S3)."""
        import posixpath

        import pyarrow.fs as pafs

        if self.kind == "local":
            parent, name = posixpath.split(self.path)
            return bool(glob.glob(posixpath.join(parent, f".{name}.staging-*", "manifest.json")))
        return self.fs.get_file_info(f"{self.path}/_COMMITTING").type == pafs.FileType.File

    def manifest(self) -> dict:
        with self.fs.open_input_stream(f"{self.path}/manifest.json") as f:
            return json.loads(f.read())

    def manifest_or_none(self) -> dict | None:
        try:
            return self.manifest()
        except FileNotFoundError:
            return None

    def size(self) -> int:
        import pyarrow.fs as pafs

        return sum(i.size for i in self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True))
                   if i.type == pafs.FileType.File)

    def level0(self) -> dict:
        import pyarrow.dataset as pds

        ds = pds.dataset(f"{self.path}/assignments/level=0", format="parquet", filesystem=self.fs)
        t = ds.to_table(columns=["id", "cluster_id"])
        return dict(zip(t.column("id").to_numpy().tolist(), t.column("cluster_id").to_numpy().tolist()))


class Table:
    """The changing table: a pool of labelled rows, of which a set of ids is present each day."""

    def __init__(self, rows: int, change: float, seed: int):
        from agc_ray.core.synthetic import make_faces

        self.rng = np.random.default_rng(seed)
        pool = int(rows * (1 + 40 * change))  # enough unseen identities for every day's additions
        self.x, self.y = make_faces(pool, seed=seed + 100)
        order = np.argsort(self.y, kind="stable")  # the first classes start present, later ones arrive
        self.x, self.y = self.x[order], self.y[order]
        self.present = np.zeros(pool, bool)
        self.present[:rows] = True
        self.next_new = rows
        self.change = change
        self.moved: set[int] = set()

    def step(self) -> dict:
        """Remove, add (new identities) and move a few percent of the rows."""
        n = int(self.present.sum())
        k = max(1, int(self.change * n))
        on = np.flatnonzero(self.present)
        self.present[self.rng.choice(on, k, replace=False)] = False
        add = np.arange(self.next_new, min(self.next_new + k, self.present.size))
        self.present[add] = True
        self.next_new += add.size
        on = np.flatnonzero(self.present)
        moved = self.rng.choice(on, max(1, k // 2), replace=False)
        donors = self.rng.choice(on, moved.size, replace=False)  # a moved row takes another row's identity
        noise = self.rng.normal(scale=0.05, size=(moved.size, self.x.shape[1])).astype(np.float32)
        self.x[moved] = self.x[donors] + noise
        self.y[moved] = self.y[donors]
        self.moved = set(moved.tolist())
        return {"removed": k, "added": int(add.size), "moved": int(moved.size)}

    def write(self, path: Path) -> None:
        from agc_ray.distributed.demo import write_table

        on = np.flatnonzero(self.present)
        for f in path.glob("*.parquet"):
            f.unlink()
        write_table(path, self.x[on], self.y[on], ids=on.astype(np.int64), files=2)


def start_ray(num_cpus: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus}", "--include-dashboard=false",
         "--disable-usage-stats"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ | {"RAY_AUTH_MODE": "disabled"},
        start_new_session=True,  # its own process group: stopped as a whole at the end
    )
    address = f"127.0.0.1:{port}"
    import ray

    for _ in range(120):  # until the head answers
        try:
            ray.init(address=address, logging_level="ERROR")
            ray.shutdown()
            return head, address
        except Exception:  # noqa: BLE001
            time.sleep(1)
    raise RuntimeError("the Ray head did not start")


def stop_ray(head: subprocess.Popen) -> None:
    """Stop the head started by :func:`start_ray` and every process of its group."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(head.pid, sig)
            head.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def run_job(argv: list[str], env: dict, log: Path, kill_after: float | None = None,
            kill_when=None) -> tuple[int | None, float, bool]:
    """Run one job; kill -9 it after ``kill_after`` s, or as soon as ``kill_when()`` is true.

    Returns (exit code, seconds, killed).
    """
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "cluster.py"), *argv], stdout=out, stderr=out,
                                env=env, cwd=ROOT)
        while proc.poll() is None:
            if (kill_after is not None and time.perf_counter() - t0 > kill_after) or (kill_when and kill_when()):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return None, time.perf_counter() - t0, True
            time.sleep(0.02)
    return proc.returncode, time.perf_counter() - t0, False


def overlap_trials(store: Store, table: Table, work: Path, model: Path, env: dict, trials: int) -> tuple[list, list]:
    """Two runs on two different tables started one second apart with one --output (the issue's report).

    Trial 0 on a fresh output without --overwrite, the others with --overwrite over the last output:
    exactly one may exit 0, the other must exit 2, and the output must be the winner's.
    """
    import shutil

    records, failures = [], []
    uri = store.uri + "-overlap"
    path = store.path + "-overlap"
    tables = []
    for name in ("a", "b"):
        table.step()
        table.write(work / f"overlap-{name}")
        tables.append(work / f"overlap-{name}")
    for trial in range(trials):
        procs = []
        for i, t in enumerate(tables):
            argv = ["--input", str(t), "--output", uri, "--model", str(model), "--knn", "exact", "--num-shards", "2"]
            if trial:
                argv.append("--overwrite")
            log = open(work / f"overlap{trial}-{i}.log", "w")
            procs.append((subprocess.Popen([sys.executable, str(ROOT / "jobs" / "cluster.py"), *argv], stdout=log,
                                           stderr=log, env=env, cwd=ROOT), log, t))
            time.sleep(1.0)
        rcs = []
        for proc, log, _ in procs:
            rcs.append(proc.wait())
            log.close()
        record = {"trial": trial, "overwrite": bool(trial), "exit_codes": rcs}
        winners = [t for (_, _, t), rc in zip(procs, rcs) if rc == 0]
        with store.fs.open_input_stream(f"{path}/manifest.json") as f:
            manifest = json.loads(f.read())
        loser_logs = [(work / f"overlap{trial}-{i}.log").read_text() for i, rc in enumerate(rcs) if rc != 0]
        record["loser_error"] = [line for text in loser_logs for line in text.splitlines() if line.startswith("error:")]
        problems = []
        if sorted(rcs) != [0, 2]:
            problems.append(f"exit codes {rcs}, expected one 0 and one 2")
        elif manifest["input"]["path"] != str(winners[0]):
            problems.append(f"output holds {manifest['input']['path']}, the winner was {winners[0]}")
        elif trial and not any(manifest["run"]["id"] in line for line in record["loser_error"]):
            problems.append(f"the loser's error does not name the winner: {record['loser_error']}")
        record["problems"] = problems
        failures += [f"overlap trial {trial}: {p}" for p in problems]
        records.append(record)
        print(f"overlap {trial} ({'--overwrite, existing output' if trial else 'fresh output'}): exit codes {rcs}, "
              f"loser: {record['loser_error'][:1]} {'OK' if not problems else problems}", flush=True)
    if store.kind == "local":
        shutil.rmtree(path, ignore_errors=True)
    return records, failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--overlaps", type=int, default=2,
                   help="trials of two runs started 1 s apart on one output (before the scheduled runs)")
    p.add_argument("--commit-kills", type=int, default=2, help="of the kills, those aimed at the commit")
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--change", type=float, default=0.02, help="share of rows removed and added per run")
    p.add_argument("--store", choices=["local", "s3"], default="local")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lease", type=float, default=30.0,
                   help="S3 commit lease (s): how long the rerun of a run killed in its commit waits")
    p.add_argument("--num-cpus", type=int, default=4)
    p.add_argument("--json", default=None, help="default: benchmarks/results/soak_<store>.json")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="agc_soak_"))
    store = Store(args.store, work)
    table = Table(args.rows, args.change, args.seed)
    from agc_ray import HiLander

    model = work / "model"
    from agc_ray.core.synthetic import make_faces

    HiLander(seed=0).fit(*make_faces(2000, seed=args.seed + 7)).save(model)  # other identities, default epochs
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the Ray head (finally) when terminated
    head, address = start_ray(args.num_cpus)
    env = os.environ | store.env | {"RAY_ADDRESS": address, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                                    "AGC_RAY_COMMIT_LEASE_S": str(args.lease)}
    rng = np.random.default_rng(args.seed)
    kill_runs = rng.choice(np.arange(1, args.runs), min(args.kills, args.runs - 1), replace=False).tolist()
    commit_kills, kill_runs = set(kill_runs[:args.commit_kills]), set(kill_runs)
    records, failures, durations = [], [], []
    last, first_bytes_per_row, last_ids = None, None, None
    try:
        overlaps, failures = overlap_trials(store, table, work, model, env, args.overlaps)
        for run in range(args.runs):
            change = table.step() if run else {}
            table.write(work / "table")
            rows = int(table.present.sum())
            job = ["--input", str(work / "table"), "--output", store.uri, "--model", str(model), "--knn", "exact",
                   "--num-shards", "2"]
            if run:
                job += ["--previous", store.uri, "--overwrite"]
            record = {"run": run, "rows": rows, **change}
            if run in kill_runs:
                log = work / f"run{run:02d}-killed.log"
                if run in commit_kills:  # at the commit: the staged manifest written / the marker taken
                    rc, secs, killed = run_job(job, env, log, kill_when=store.committing)
                    record |= {"killed_at": "commit"}
                else:
                    kill_after = float(rng.uniform(0.1, 0.9) * min(durations[-3:]))  # before the run ends
                    rc, secs, killed = run_job(job, env, log, kill_after=kill_after)
                    record |= {"killed_at": f"{kill_after:.1f}s"}
                record |= {"killed": killed, "killed_rc": rc}
                if last is not None and store.manifest_or_none() is not None \
                        and store.manifest_or_none()["run"]["id"] != last["run"]["id"]:
                    # the kill came after the commit: that run's output is the previous of the rerun
                    record["killed_after_its_commit"] = True
                    last, last_ids = store.manifest(), store.level0()
            rc, secs, _ = run_job(job, env, work / f"run{run:02d}.log")
            durations.append(secs)
            record |= {"rc": rc, "seconds": round(secs, 1)}
            problems = []
            if rc != 0:
                problems.append(f"exit code {rc} (log {work / f'run{run:02d}.log'})")
            else:
                left = store.leftovers()
                if left:
                    problems.append(f"left behind: {left}")
                m = store.manifest()
                ids = store.level0()
                size = store.size()
                record |= {"run_id": m["run"]["id"], "next_cluster_ids": m["next_cluster_ids"], "bytes": size,
                           "clusters": m["cluster_counts"]}
                if m.get("status") != "succeeded":
                    problems.append(f"manifest status {m.get('status')}")
                if last is not None:
                    prev_id = (m.get("previous") or {}).get("run_id")
                    if "killed" in record and prev_id not in (last["run"]["id"], m["run"]["id"], None):
                        # the kill came during the commit: the rerun finished it (recovery) and chained to it
                        record["killed_commit_finished_by_rerun"] = True
                    elif m["run"]["id"] == last["run"]["id"] or prev_id != last["run"]["id"]:
                        problems.append("manifest does not chain to the previous run")
                    old, new = last["next_cluster_ids"], m["next_cluster_ids"]
                    # the level-0 counter grows with each day's new identities; a rerun on the same table
                    # (its killed attempt had committed) issues no new id
                    grows = new[0] > old[0] or record.get("killed_after_its_commit") \
                        or record.get("killed_commit_finished_by_rerun")
                    if any(b < a for a, b in zip(old, new)) or len(new) < len(old) or not grows:
                        problems.append(f"counters {old} -> {new}")
                    churn = m["levels"][0]["churn"]
                    kept = churn["kept"] / max(1, churn["previous_clusters"])
                    unchanged = [i for i in ids if i in last_ids and i not in table.moved]
                    if not unchanged:
                        problems.append("no unchanged rows to compare ids on")
                    same = float(np.mean([ids[i] == last_ids[i] for i in unchanged])) if unchanged else 0.0
                    record |= {"kept_clusters": round(kept, 3), "unchanged_rows_same_id": round(same, 3)}
                    if kept < 0.9 or same < 0.9:
                        problems.append(f"ids not stable: kept {kept:.3f}, unchanged rows {same:.3f}")
                    if first_bytes_per_row and size / rows > 1.5 * first_bytes_per_row:
                        problems.append(f"output grew: {size / rows:.0f} B/row vs {first_bytes_per_row:.0f}")
                else:
                    first_bytes_per_row = size / rows
                last, last_ids = m, ids
            record["problems"] = problems
            failures += [f"run {run}: {p}" for p in problems]
            records.append(record)
            kill = (f" killed at {record['killed_at']} ({'yes' if record['killed'] else 'had finished'}"
                    f"{', after its commit' if record.get('killed_after_its_commit') else ''}"
                    f"{', its commit finished by the rerun' if record.get('killed_commit_finished_by_rerun') else ''}),"
                    if "killed" in record else "")
            print(f"run {run:2d}: {rows} rows,{kill} rc {rc}, {secs:.1f}s, clusters {record.get('clusters')}, "
                  f"kept {record.get('kept_clusters')}, same ids {record.get('unchanged_rows_same_id')}, "
                  f"{record.get('bytes')} B {'OK' if not problems else problems}", flush=True)
    finally:
        stop_ray(head)
    killed = sum(bool(r.get("killed")) for r in records)
    summary = {"store": args.store, "overlaps": overlaps, "runs": args.runs, "kills_planned": len(kill_runs), "kills_done": killed,
               "rows": args.rows, "change": args.change, "failures": failures, "records": records}
    path = Path(args.json or ROOT / "benchmarks" / "results" / f"soak_{args.store}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))
    print(f"{len(overlaps)} overlap trials; {args.runs} runs, {killed} killed mid-run and recovered; "
          f"{len(failures)} failed checks -> {path}")
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
