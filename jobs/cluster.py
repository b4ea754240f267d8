"""Cluster a Parquet table of embeddings with Hi-LANDER on Ray; write every hierarchy level as Parquet.

With no arguments, runs the embedded demo on a local Ray instance: a synthetic labelled split trains a
small model, a synthetic table of other identities is written as Parquet and clustered by the job,
and a summary and the output path are printed.

Input (--input): a Parquet file, a directory of them or a glob, local or s3:// (endpoint and
credentials from the usual AWS environment variables). Columns: id (int64 or string, unique), embedding
(list, fixed-size list or fixed_shape_tensor of numbers), optional label (int: metrics per level).

Output (--output, local or s3://):
  assignments/level=L/*.parquet  id, cluster_id               one row per input row and level
  clusters/level=L/*.parquet     cluster_id, size, peak_id, parent_cluster_id (null at the top level)
  state/                         what jobs/assign.py needs to add new rows (features, kNN graphs,
                                 densities, clusters per level; --no-assign-state: not written)
  manifest.json                  written last: parameters, timings, per-level counts and metrics
                                 (and churn per level with --previous)

Results are staged beside the output and committed at the end; an existing non-empty output is refused
unless --overwrite. Exit codes: 0 success, 2 bad input or parameters (one line on stderr), 1 other
failures.

Examples:
  python jobs/cluster.py
  python jobs/cluster.py --input s3://bucket/emb/ --output s3://bucket/clusters/ --model my_model
  python jobs/cluster.py --input s3://bucket/emb/ --output s3://bucket/clusters/2026-11-23 \
      --previous s3://bucket/clusters/2026-11-22 --model my_model
  python jobs/cluster.py --config job.yaml --dry-run    # check and estimate, write nothing
  ray job submit --working-dir . -- python jobs/cluster.py --config job.yaml --num-shards 8
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error on stderr and exit code 2."""

    def error(self, message):
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from agc_ray.core.params import DECODE_MODES

    p = _Parser(
        prog="jobs/cluster.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    io_ = p.add_argument_group("input and output")
    io_.add_argument("--config", metavar="FILE.yaml",
                     help="YAML mapping of any of the options below (keys with - or _); flags win")
    io_.add_argument("--input", help="Parquet file, directory or glob, local or s3://")
    io_.add_argument("--output", help="output directory or s3:// prefix")
    io_.add_argument("--overwrite", action="store_true", default=None,
                     help="replace an existing non-empty output (at the commit only)")
    io_.add_argument("--previous", metavar="OUTPUT",
                     help="a completed earlier output (local or s3://): keep its cluster ids for the clusters that "
                          "continue earlier ones, fresh never-reused ids for the rest; churn per level in the manifest "
                          "(may equal --output with --overwrite)")
    io_.add_argument("--no-assign-state", dest="assign_state", action="store_false", default=None,
                     help="do not write state/ (what jobs/assign.py needs to add rows to this output; "
                          "~1.5 GB per million 256-d rows)")
    io_.add_argument("--id-column", help="id column (default: id)")
    io_.add_argument("--embedding-column", help="embedding column (default: embedding)")
    io_.add_argument("--label-column", help="integer class column for per-level metrics (default: label, if present)")
    m = p.add_argument_group("model and parameters (default: the model's own values)")
    m.add_argument("--model", metavar="DIR", help="directory written by HiLander.save or the training job")
    m.add_argument("--unsupervised", action="store_true", default=None,
                   help="no model: similarity density and similarity decode")
    m.add_argument("--k", type=int, help="neighbours per node (must match the model's; default 10 unsupervised)")
    m.add_argument("--tau", type=float, help="decode threshold on p_ij (prob) or s_ij (sim) at every level "
                   "(default: the model's per-level taus, chosen on validation or 0.9 at level 0, 0.5 at 1, 0.95 above; "
                   "unsupervised: derived from the table)")
    m.add_argument("--max-levels", type=int, help="maximum number of hierarchy levels (default: the model's, else 10; "
                   "unsupervised without --tau: 6, the selected level and two coarser ones)")
    m.add_argument("--knn", choices=("auto", "exact", "ivf"),
                   help="kNN search: exact (flat), ivf (approximate, recall reported), auto (exact up to 20K nodes)")
    m.add_argument("--knn-recall", type=float, metavar="R",
                   help="recall@k target of the approximate search: at every IVF level each row probes the cells "
                        "within a margin of its best one, and the margin is raised until the recall measured on "
                        "1000 sampled rows against exact search reaches R (default: the model's, 0.95)")
    m.add_argument("--decode", choices=DECODE_MODES, help="decode on edge probabilities or similarities")
    m.add_argument("--no-early-stop", dest="early_stop", action="store_false", default=None,
                   help="disable the early-stop rule (E_prev / E < k)")
    m.add_argument("--boundary-closeness", type=closeness_or_off, metavar="C",
                   help="above level 0, also merge clusters whose boundary in the level-0 kNN graph is this close to "
                        "their insides, from chance (0-1; 'off': the decode alone; default: the model's, 0.7)")
    m.add_argument("--knn-recall-sample", type=int, metavar="ROWS",
                   help="rows whose neighbours are searched exactly to tune the IVF search to --knn-recall and report "
                        "its recall (default: 1000; 0: no tuning, 16 cells, no recall reported)")
    m.add_argument("--seed", type=int, help="seed of the IVF training sample")
    m.add_argument("--num-shards", type=int, help="node shards (default 0: one per CPU of the Ray cluster)")
    io_.add_argument("--dry-run", action="store_true",
                     help="check the input (footers, a sample of rows, every id), model, parameters and output, print "
                          "the plan with an estimate of peak memory per node and run time (last line: JSON), write "
                          "nothing; exit 0, or 2 with the message the real run would give")
    r = p.add_argument_group("Ray")
    r.add_argument("--num-cpus", type=int,
                   help="CPUs of the local Ray instance started when not inside `ray job submit` (default: all)")
    d = p.add_argument_group("demo (used when neither --input nor --config is given)")
    d.add_argument("--demo-rows", type=int, default=20_000, help="rows of each synthetic split (default: %(default)s)")
    d.add_argument("--epochs", type=int, default=4, help="training epochs of the demo model (default: %(default)s)")
    d.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging, and other libraries' INFO lines (default: theirs from WARNING)")
    return p


def closeness_or_off(value: str):
    """--boundary-closeness: 'off' or a number (its range is checked with the other parameters)."""
    return "off" if value.strip().lower() == "off" else float(value)


def job_keys() -> tuple[str, ...]:
    """The job's settings: JobConfig's fields (each has a flag above, YAML keys by the same names)."""
    from agc_ray.distributed.job import JobConfig

    return tuple(JobConfig.fields())


def load_config(path: str) -> dict:
    """The YAML file as a dict of option names (``no-early-stop: true`` becomes ``early_stop: False``)."""
    from agc_ray.distributed.config import load_options

    out = load_options(path, job_keys() + ("num_cpus", "no_early_stop", "no_assign_state"))
    if "no_early_stop" in out:
        out["early_stop"] = not out.pop("no_early_stop")
    if "no_assign_state" in out:
        out["assign_state"] = not out.pop("no_assign_state")
    return out


def job_config(args: argparse.Namespace):
    """Merge the YAML config and the flags (flags win) into a JobConfig."""
    from agc_ray.distributed.job import JobConfig

    values = load_config(args.config) if args.config else {}
    for name in job_keys() + ("num_cpus",):
        flag = getattr(args, name, None)
        if flag is not None:
            values[name] = flag
    args.num_cpus = values.pop("num_cpus", None)
    cfg = JobConfig(**{k: v for k, v in values.items() if v is not None})
    if cfg.num_shards is None:
        cfg.num_shards = 0
    return cfg


def init_ray(num_cpus: int | None = None):
    """Attach to the cluster of ``ray job submit`` (RAY_ADDRESS), else start a private local instance."""
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level=logging.WARNING)
    else:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                 logging_level=logging.WARNING)


def dry_run(cfg, num_cpus: int | None) -> int:
    """Print the plan of a run (InputError, as the real run raises it, propagates)."""
    from agc_ray.distributed.plan import plan_job

    print(plan_job(cfg, num_cpus).report())
    return 0


def main(argv=None) -> int:
    if not os.environ.get("RAY_ADDRESS"):
        # a private Ray instance: token authentication chosen explicitly (Ray's default turns it on with a
        # WARNING); set before anything imports Ray, which reads it once
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad flag (2, one line already printed)
        return int(e.code or 0)
    from agc_ray.distributed import logs

    logs.configure(args.verbose)
    from agc_ray.distributed.errors import InputError

    try:
        if args.dry_run:
            return dry_run(job_config(args), args.num_cpus)
        if args.input is None and args.config is None and args.output is None and args.model is None:
            init_ray(args.num_cpus)
            from agc_ray.distributed.demo import run_demo

            run_demo(n_rows=args.demo_rows, epochs=args.epochs)
            return 0
        cfg = job_config(args)
        from agc_ray.distributed.job import run_job, validate_config

        validate_config(cfg)  # before starting Ray: bad parameters fail fast
        init_ray(args.num_cpus)
        manifest = run_job(cfg)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"clustered {manifest['input']['rows']} rows into levels {manifest['cluster_counts']} -> {cfg.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
