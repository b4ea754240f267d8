"""Train a Hi-LANDER model on a labelled embedding table with Ray Train (DDP over N workers).

  python jobs/train.py --input TABLE --output MODEL_DIR [--num-workers N] [--use-gpu] [--epochs E]
                       [--config FILE.yaml] [...]
  ray job submit --working-dir . -- python jobs/train.py --input s3://bucket/table --output model ...
  python jobs/train.py --input TABLE --output MODEL_DIR --dry-run     # check and estimate, write nothing

TABLE: a Parquet file, directory or glob, local or s3:// (credentials and endpoint from the usual AWS
environment), with an id, an embedding (list / fixed-size list / fixed_shape_tensor of floats) and an
integer label column. MODEL_DIR is written in the HiLander.save format (loads with HiLander.load and
jobs/cluster.py --model MODEL_DIR) with a "training" block in config.json: data fingerprint, epochs,
per-epoch loss and validation Fp / Fb / NMI.

Checkpoints go to --storage-path (default MODEL_DIR.checkpoints; local or s3://) under --run-name
(default: a hash of input, output and model parameters) after every --checkpoint-every epochs. A lost
worker restarts the worker group from the latest checkpoint (up to --max-failures times); --resume
continues an interrupted run from its latest checkpoint.

--config FILE.yaml gives any of the options below as keys (dashes or underscores); flags win.
Exit codes: 0 done, 2 bad input or parameters (one line on stderr, nothing written), 1 training failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

#: Help of the job's own settings; the model's come with their declaration (agc_ray.core.params).
_HELP = {
    "input": "input table: Parquet file, directory or glob, local or s3:// (required)",
    "output": "output model directory, local (required)",
    "id_column": "id column (int64 or string, unique)",
    "embedding_column": "embedding column (list of floats, one dimension)",
    "label_column": "integer class label column",
    "num_workers": "Ray Train workers (DDP ranks)",
    "use_gpu": "one GPU per worker, NCCL backend (default: CPU, gloo)",
    "cpus_per_worker": "CPUs reserved per worker (fractional allowed); torch threads = max(1, floor)",
    "storage_path": "checkpoint storage, local or s3:// (default: OUTPUT.checkpoints)",
    "run_name": "run name under the storage path (default: hash of input, output and parameters)",
    "checkpoint_every": "checkpoint every N epochs (and after the last)",
    "keep_checkpoints": "checkpoints kept",
    "max_failures": "worker-group restarts from the latest checkpoint before failing (-1: no limit)",
    "resume": "continue the run's latest checkpoint (an interrupted run)",
    "overwrite": "replace an existing non-empty output directory",
    "val_fraction": "fraction of classes held out for validation (0: none)",
    "batch_size": "global batch of seed nodes per step (each worker takes 1/N)",
}
_GROUPS = {
    "input/output": ("input", "output", "id_column", "embedding_column", "label_column", "overwrite"),
    "distribution": ("num_workers", "use_gpu", "cpus_per_worker", "storage_path", "run_name", "checkpoint_every",
                     "keep_checkpoints", "max_failures", "resume"),
}


def build_parser():
    from agc_ray.core.params import PARAMS
    from agc_ray.distributed.train import TrainJobConfig, config_fields, flag

    defaults = TrainJobConfig()
    parser = argparse.ArgumentParser(
        prog="jobs/train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of options (flags win)")
    parser.add_argument("--num-cpus", type=float, default=None,
                        help="logical CPUs of the local Ray instance started outside `ray job submit`")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and other libraries' INFO lines (default: theirs from WARNING)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the input (footers, a sample of rows, every id, the class split), parameters, "
                             "output and checkpoints, print the plan with an estimate of peak memory and run time "
                             "(last line: JSON), write nothing; exit 0, or 2 with the message the real run would give")
    groups = {name: parser.add_argument_group(name) for name in (*_GROUPS, "model and optimiser")}
    for name, f in config_fields().items():
        group = next((groups[g] for g, names in _GROUPS.items() if name in names), groups["model and optimiser"])
        default = getattr(defaults, name)
        param = PARAMS.get(name)
        help_text = f"{_HELP.get(name) or param.help} (default: {default})"
        if isinstance(default, bool):
            group.add_argument(flag(name), action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            kind = param.kind if param else {int: int, float: float}.get(type(default), str)
            group.add_argument(flag(name), type=kind, default=default, help=help_text, metavar=name.upper())
    return parser


def parse_config(argv):
    """``(TrainJobConfig, options)`` from flags over YAML over defaults; ``options``: the flags that are
    not training parameters (``num_cpus``, ``dry_run``, ``verbose``)."""
    from agc_ray.distributed.config import load_options
    from agc_ray.distributed.train import TrainJobConfig, config_fields

    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**load_options(known.config, set(config_fields())))
    args = parser.parse_args(argv)
    values = {name: getattr(args, name) for name in config_fields()}
    options = argparse.Namespace(num_cpus=args.num_cpus, dry_run=args.dry_run, verbose=args.verbose)
    return TrainJobConfig(**values), options


def connect_ray(num_cpus):
    """Attach inside ``ray job submit`` (RAY_ADDRESS set) or to this process's session; else start one."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        # the dashboard serves the State API that Ray Train's placement-group cleaner polls (without it,
        # a WARNING every few seconds); the preemption watcher (node drains) is off: this job recovers from
        # lost workers through checkpoints, and the watcher's actor makes Ray log an error-level line
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}})


def main(argv=None) -> int:
    if not os.environ.get("RAY_ADDRESS"):
        # a private Ray instance: token authentication chosen explicitly (Ray's default turns it on with a
        # WARNING); set before anything imports Ray, which reads it once
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from agc_ray.distributed.errors import InputError, one_line

    try:
        cfg, options = parse_config(argv)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from agc_ray.distributed import logs

    logs.configure(options.verbose)
    from agc_ray.distributed.train import run_training

    try:
        if options.dry_run:
            from agc_ray.distributed.plan import plan_training

            print(plan_training(cfg, options.num_cpus).report())
            return 0
        cfg.validate()  # parameter errors before any Ray start-up
        connect_ray(options.num_cpus)
        summary = run_training(cfg)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - training failures: one summary line, log has the rest
        logging.getLogger("agc_ray").exception("training failed")
        detail = f"{type(e).__name__}: {one_line(e)}" if str(e).strip() else type(e).__name__
        print(f"error: training failed ({detail}); "
              f"rerun with --resume to continue from the latest checkpoint", file=sys.stderr)
        return 1
    m = summary["metrics"]
    print(
        f"trained {summary['epochs']} epochs on {summary['train_rows']} rows with {summary['num_workers']} worker(s): "
        f"loss {m.get('loss_conn', float('nan')):.4f}/{m.get('loss_den', float('nan')):.4f}, "
        f"val Fp {m.get('val_fp', float('nan')):.4f} Fb {m.get('val_fb', float('nan')):.4f} "
        f"NMI {m.get('val_nmi', float('nan')):.4f}; model: {summary['output']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
