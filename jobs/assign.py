"""Add new rows to a finished clustering without re-clustering it: every new row gets a cluster id at
every level of the base output.

A new row joins the cluster of its best linked denser neighbour (kNN against the base rows and the other
new rows, edge probabilities from the base run's model, the base run's decode rule and thresholds);
rows that link to no base row form new clusters among themselves, with fresh ids from the base's
never-reused counters. The base rows keep their clusters.

Base (--base): a completed output of jobs/cluster.py (written with its assignment state, the default)
or of this job, local or s3://. Input (--input): the new rows, with the base's columns and dimension.

Output (--output, local or s3://): the clustering job's contract for base + new rows (assignments and
clusters per level, state/, manifest.json with an "incremental" section: the base, the rows that joined
base clusters and the new clusters per level, report.html), committed atomically; it is itself a base
for the next assignment and a --previous for the next full run. Exit codes: 0 success, 2 bad input or
parameters (one line on stderr, nothing written), 1 other failures.

Examples:
  python jobs/assign.py --base out/2026-12-01 --input new_rows/ --output out/2026-12-01-1400
  ray job submit --working-dir . -- python jobs/assign.py --base s3://b/clusters/daily \\
      --input s3://b/emb/new/ --output s3://b/clusters/daily --overwrite
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cluster import EXIT_BAD_INPUT, _Parser, init_ray  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="jobs/assign.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, metavar="OUTPUT", help="a completed clustering output, local or s3://")
    p.add_argument("--input", required=True, help="the new rows: Parquet file, directory or glob, local or s3://")
    p.add_argument("--output", required=True, help="output directory or s3:// prefix (may equal --base with --overwrite)")
    p.add_argument("--model", metavar="DIR", help="model directory (default: the one the base run used)")
    p.add_argument("--id-column", default="id", help="id column (default: %(default)s)")
    p.add_argument("--embedding-column", default="embedding", help="embedding column (default: %(default)s)")
    p.add_argument("--replace", action="store_true",
                   help="re-assign rows whose id is already in the base (default: refuse them, exit 2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output (at the commit only)")
    p.add_argument("--num-shards", type=int, default=0, help="row shards of the read (default 0: one per CPU)")
    p.add_argument("--num-cpus", type=int,
                   help="CPUs of the local Ray instance started when not inside `ray job submit` (default: all)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and other libraries' INFO lines")
    return p


def main(argv=None) -> int:
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_AUTH_MODE", "token")  # as jobs/cluster.py: before anything imports Ray
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    from agc_ray.distributed import logs

    logs.configure(args.verbose)
    from agc_ray.distributed.assign import AssignConfig, run_assign, validate_assign_config
    from agc_ray.distributed.errors import InputError

    cfg = AssignConfig(base=args.base, input=args.input, output=args.output, model=args.model,
                       id_column=args.id_column, embedding_column=args.embedding_column, replace=args.replace,
                       overwrite=args.overwrite, num_shards=args.num_shards)
    try:
        validate_assign_config(cfg)
        init_ray(args.num_cpus)
        manifest = run_assign(cfg)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    inc = manifest["incremental"]
    print(f"assigned {inc['new_rows']} new rows: {inc['rows_in_base_clusters']} in base clusters per level, "
          f"{inc['new_clusters']} new clusters per level -> {cfg.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
