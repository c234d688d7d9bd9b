"""Train a ViT with Feature Selection Gates and Gradient Routing on CIFAR-100 (torchvision's on-disk
cifar-100-python folder); settings in ``fsg_endo/experiment/configs/cifar100_fsg.yaml``, changed with ``--set``."""

import sys

from fsg_endo.experiment.demos import training_main

if __name__ == "__main__":
    sys.exit(training_main("cifar100", sys.argv[1:], prog="demo_training_cifar100.py"))
