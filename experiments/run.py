"""Run an fsg_endo experiment: ``python experiments/run.py --exp polyp_size_fsg [--set key=value ...]``."""

import argparse
import sys

from fsg_endo.cli import add_run_arguments, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_run_arguments(parser)
    parser.parse_args()  # validate and answer --help here; the package does the rest
    sys.exit(main(["run", *sys.argv[1:]]))
