"""Train a ViT with Feature Selection Gates and Gradient Routing on MNIST (torchvision's on-disk files),
or on scikit-learn's bundled handwritten digits when MNIST is not on disk."""

import sys

from fsg_endo.experiment.demos import training_main

if __name__ == "__main__":
    sys.exit(training_main("mnist", sys.argv[1:], prog="demo_training_mnist.py"))
