"""Fine-tune a transformers text classifier (BERT-Tiny by default) with Feature Selection Gates and Gradient
Routing on your own CSV of text,label (--data-root FILE)."""

import sys

from fsg_endo.experiment.demos import training_main

if __name__ == "__main__":
    sys.exit(training_main("text", sys.argv[1:], prog="demo_training_text.py"))
