"""fsg_endo: Feature Selection Gates with Gradient Routing on Vision Transformers for polyp sizing.

The public API (docs/interfaces.md#python-api) is imported lazily, so ``fsg-endo synth`` and the data tools start
without loading torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_API = {
    "vit_with_fsg": "fsg_endo.nn.gates",
    "inject_fsg": "fsg_endo.nn.gates",
    "gate_parameters": "fsg_endo.nn.gates",
    "non_gate_parameters": "fsg_endo.nn.gates",
    "gate_values": "fsg_endo.nn.gates",
    "gate_statistics": "fsg_endo.nn.gates",
    "fold_gates": "fsg_endo.nn.gates",
    "GradientRouter": "fsg_endo.nn.routing",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'fsg_endo' has no attribute {name!r}")
