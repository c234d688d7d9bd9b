"""Predict the held-out split with the trained CIFAR-100 demo checkpoint (loaded with weights_only=True)."""

import sys

from fsg_endo.experiment.demos import inference_main

if __name__ == "__main__":
    sys.exit(inference_main("cifar100", sys.argv[1:], prog="demo_inference_cifar100.py"))
