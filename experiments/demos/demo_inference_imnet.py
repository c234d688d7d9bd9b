"""Predict the held-out split with the trained Imagenette demo checkpoint (loaded with weights_only=True)."""

import sys

from fsg_endo.experiment.demos import inference_main

if __name__ == "__main__":
    sys.exit(inference_main("imagenette", sys.argv[1:], prog="demo_inference_imnet.py"))
