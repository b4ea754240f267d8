"""Cluster an embedding table with Hi-LANDER.

With no arguments, runs the embedded demo: a synthetic labelled split trains a small model, a split of
other identities is clustered, every level is written as Parquet under agc_output/demo, and a summary
is printed.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="agc_output/demo", help="output directory (default: %(default)s)")
    parser.add_argument("--demo-rows", type=int, default=20_000, help="rows of each synthetic split")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs of the demo model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from agc_ray.demo import run_demo

    run_demo(args.output, n_train=args.demo_rows, n_test=args.demo_rows, epochs=args.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
