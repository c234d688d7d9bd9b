"""The arms of the study, one row per ``regularizer`` value: what each arm's model and training are.

Every other place that asks about an arm reads this table: the config's ``regularizer`` choices
(:mod:`fsg_endo.engine.schema`), the recipe's model and optimisers (:mod:`fsg_endo.engine.recipe`), the
logged params ``fsg.enabled`` / ``gr.enabled`` (:func:`fsg_endo.experiment.runs.run_params`) and the order of
arms in reports. A new arm is one row here plus what its row asks of the model builder. Plain data: importing
it loads neither torch nor scikit-learn, so the config is checked before either.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class Arm:
    """One ``regularizer`` value and what it means for the run."""

    name: str
    description: str
    gated: bool = False  # the ViT carries FSG gates (param fsg.enabled)
    routed: bool = False  # Gradient Routing: gates and the rest train in two passes (param gr.enabled)
    frozen_gates: bool = False  # the gates keep their init: no optimiser, requires_grad=False
    accumulates_gate_pass: bool = False  # GR keeps the gate pass's gradients for the main step (released code)
    dropout: bool = False  # model.dropout, attention_dropout and stochastic_depth apply
    baseline: str | None = None  # a classical scikit-learn baseline (fsg_endo.engine.baselines.BASELINES), no ViT
    model_options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # more build_model kwargs

    @property
    def trained(self) -> bool:
        """Whether the arm trains a network (every arm but the classical baselines)."""
        return self.baseline is None


# the order is the order of arms in reports and tables
ARMS: dict[str, Arm] = {
    arm.name: arm
    for arm in (
        Arm("none", "the plain ViT"),
        Arm("dropout", "the plain ViT with dropout, attention dropout and stochastic depth", dropout=True),
        Arm("fsg", "FSG gates trained jointly with the network (their own learning rate)", gated=True),
        Arm("fsg_gr", "FSG gates trained by Gradient Routing", gated=True, routed=True),
        Arm("baseline_box", "scikit-learn on the box geometry (no network)", baseline="box"),
        Arm("baseline_appearance", "scikit-learn on box, colour, brightness and texture", baseline="appearance"),
        Arm(
            "fsg_frozen",
            "the gated ViT with its gates kept at init: what the gates learn",
            gated=True,
            frozen_gates=True,
        ),
        Arm(
            "fsg_gr_release",
            "Gradient Routing as the paper's released code does it (gate-pass gradients accumulate)",
            gated=True,
            routed=True,
            accumulates_gate_pass=True,
        ),
        Arm(
            "layerscale",
            "a learnable per-channel scale on each residual branch (CaiT's LayerScale): unbounded, starting where "
            "the gates' sigmoid starts, trained by the main optimiser",
            model_options=MappingProxyType({"layer_scale": True}),
        ),
    )
}
ARM_NAMES: tuple[str, ...] = tuple(ARMS)


def arms_where(fact: str) -> tuple[str, ...]:
    """The names of the arms for which ``fact`` (a boolean field of :class:`Arm`) holds, in table order."""
    return tuple(name for name, arm in ARMS.items() if getattr(arm, fact))
