"""The project's own pretrained backbones, made on first use like the synthetic data cache.

A shipped experiment registers its model under ``tracking.register_model``: ``pretrain_mae`` its encoder
(``fsg_endo_mae_backbone``), ``pretrain_sim`` a sizing model trained on another pool's sizes
(``fsg_endo_sim_backbone``, whose ViT is the backbone). A run whose ``model.weights`` names such a model
(``models:/fsg_endo_mae_backbone/1``, ``.../latest`` or ``...@alias``) in a tracking store that does not hold it
yet first runs that experiment into the same store (with the profile that registers that name, and the run's
``--smoke``), said in one line; later runs find it registered and reuse it.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable

from fsg_endo.engine.backbones import loaded_weights
from fsg_endo.engine.schema import PROFILES, Config
from fsg_endo.experiment.config import list_experiments, load_config

PRETRAINING_MINUTES = 16  # the shipped CPU default on 2 cores, pool generation included (docs/benchmarks.md)


def producers() -> dict[str, tuple[str, str | None]]:
    """Registered model name -> the shipped experiment and profile (None: none) that register it."""
    made = {}
    for exp in list_experiments():
        for profile in (None, *PROFILES):
            name = load_config(exp, [], profile=profile).tracking.register_model
            if name:
                made.setdefault(name, (exp, profile))
    return made


def named_model(weights: str | None) -> str | None:
    """The registered model a ``models:/`` value names (``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``)."""
    match = re.fullmatch(r"models:/([^/@]+)(?:/[^/]+|@.+)", weights or "")
    return match.group(1) if match else None


def registered(name: str, tracking_uri: str) -> bool:
    import mlflow

    return bool(mlflow.MlflowClient(tracking_uri=tracking_uri).search_model_versions(f"name = '{name}'"))


def pretrain_missing(
    configs: Iterable[Config], tracking_uri: str, pretrain: Callable[[str, str | None], None]
) -> list[str]:
    """Run ``pretrain(experiment, profile)`` for every project backbone the configs name that the store lacks;
    returns the names pretrained."""
    wanted = {named_model(loaded_weights(cfg)) for cfg in configs} - {None}
    if not wanted:
        return []
    made = producers()
    runs = []
    for name in sorted(wanted & set(made)):
        if registered(name, tracking_uri):
            continue
        exp, profile = made[name]
        how = f"experiment {exp}" + (
            f", profile {profile}" if profile else f"; about {PRETRAINING_MINUTES} min on 2 CPU cores"
        )
        print(
            f"fsg-endo: model.weights names {name}, which {tracking_uri} does not hold yet: pretraining it first "
            f"({how}, once)",
            file=sys.stderr,
        )
        pretrain(exp, profile)
        runs.append(name)
    return runs
