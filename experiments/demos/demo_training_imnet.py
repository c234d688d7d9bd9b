"""Train a ViT with Feature Selection Gates and Gradient Routing on Imagenette (an imagenette2-160 ImageFolder root)."""

import sys

from fsg_endo.experiment.demos import training_main

if __name__ == "__main__":
    sys.exit(training_main("imagenette", sys.argv[1:], prog="demo_training_imnet.py"))
