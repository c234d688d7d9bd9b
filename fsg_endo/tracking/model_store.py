"""MLflow models without pickle: a sizing model logged as a ``torch.export`` program (pt2), and loaded back.

The logged model carries a tensor signature (image, and box when the model takes one), and the settings it
must be fed with (crop, normalisation, task) as ``metadata["fsg_endo"]``. It loads with
``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``: nothing in it is unpickled. A logged model's tensors, or a
weight file among a run's artifacts, can start another model (``model.weights``: ``models:/``, ``runs:/``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from fsg_endo.errors import FsgEndoError

METADATA_KEY = "fsg_endo"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
INPUT_NAMES = ("image", "box")


@contextlib.contextmanager
def global_store(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to ``uri`` for the calls that only read the global store (model logging
    and loading), then put back, with the ``MLFLOW_TRACKING_URI`` variable that ``mlflow.set_tracking_uri`` also
    sets: a later run of the same process must not silently log into this store."""
    before_env, before = os.environ.get(TRACKING_ENV), mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if before_env is None:
            os.environ.pop(TRACKING_ENV, None)
        else:
            os.environ[TRACKING_ENV] = before_env


def pip_requirements() -> list[str]:
    """Pinned requirements of a logged model, stated explicitly so MLflow does not infer them (slow)."""
    import torch
    import torchvision

    return [f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}"]


def _spec(tensor, name: str | None = None) -> TensorSpec:
    """A tensor's spec with a dynamic batch dimension."""
    return TensorSpec(np.dtype(str(tensor.dtype).removeprefix("torch.")), (-1, *tensor.shape[1:]), name)


def tensor_signature(example: Sequence[Any], output: Any) -> ModelSignature:
    """The signature of a model called as ``model(image[, box])``: named input tensors, one output tensor."""
    inputs = Schema([_spec(t, name) for t, name in zip(example, INPUT_NAMES)])
    return ModelSignature(inputs=inputs, outputs=Schema([_spec(output)]))


def log_pt2_model(
    uri: str,
    run_id: str,
    model,
    example: Sequence[Any],
    metadata: Mapping[str, Any],
    *,
    name: str = "model",
    registered_model_name: str | None = None,
    step: int = 0,
):
    """Export ``model`` (eval mode, CPU) on ``example`` and log it to run ``run_id`` as an MLflow LoggedModel.

    The run's metrics at ``step`` are linked to the model; ``registered_model_name`` also registers it in
    the Model Registry (the version links back to the run). Returns MLflow's ``ModelInfo``.
    """
    import mlflow.pytorch
    import torch

    model = model.eval()
    with torch.no_grad():
        output = model(*example)
    client = mlflow.MlflowClient(uri)  # Model.log talks to the global store and its global experiment:
    logged = client.create_logged_model(client.get_run(run_id).info.experiment_id, name=name, source_run_id=run_id)
    with global_store(uri):  # ... so the model is made in the run's own experiment here, and logged there
        return mlflow.pytorch.log_model(
            model,
            name=name,
            run_id=run_id,
            model_id=logged.model_id,
            serialization_format="pt2",
            input_example=tuple(example),
            signature=tensor_signature(example, output),
            metadata={METADATA_KEY: dict(metadata)},
            pip_requirements=pip_requirements(),
            registered_model_name=registered_model_name,
            step=step,
        )


class InferenceModule:
    """A loaded model, put in eval mode once and kept there: ``eval()`` is a no-op. A ``torch.export``
    program was exported in eval mode (dropout off) and refuses ``eval()`` and ``train()`` itself."""

    def __init__(self, module) -> None:
        with contextlib.suppress(NotImplementedError):
            module.eval()
        self.module = module

    def __call__(self, *inputs):
        return self.module(*inputs)

    def eval(self) -> InferenceModule:
        return self


@dataclass
class LoadedModel:
    """A sizing model loaded from MLflow: the callable module, its fsg_endo metadata and where it came from."""

    module: Any
    metadata: dict[str, Any]
    run_id: str | None
    uri: str


def resolve_model_uri(uri: str, client: mlflow.MlflowClient) -> str:
    """``runs:/<id>/<name>`` as the ``models:/<model id>`` of the LoggedModel that run logged under that name
    (MLflow 3 keeps models beside runs, not in them); other model URIs as they are, local folders absolute."""
    if uri.startswith("runs:/"):
        run_id, _, name = uri.removeprefix("runs:/").partition("/")
        run = client.get_run(run_id)
        found = client.search_logged_models([run.info.experiment_id], filter_string=f"name = '{name or 'model'}'")
        for logged in found:
            if logged.source_run_id == run_id:
                return f"models:/{logged.model_id}"
        raise MlflowException(f"run {run_id} logged no model named {name!r}")
    if "://" in uri or uri.startswith("models:/"):
        return uri
    path = Path(uri)
    if not (path / "MLmodel").is_file():
        raise FsgEndoError(f"{path}: not an MLflow model folder (no MLmodel file)")
    return str(path.resolve())


def load_model(uri: str, tracking_uri: str) -> LoadedModel:
    """Load ``runs:/<id>/model``, ``models:/<name>/<version>`` or a local model folder, without pickle.

    A model saved with pickle is refused unless ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION`` says otherwise.
    """
    import mlflow.pytorch

    with global_store(tracking_uri):
        try:
            info = mlflow.models.get_model_info(resolve_model_uri(uri, mlflow.MlflowClient(tracking_uri)))
        except (MlflowException, OSError) as err:
            raise FsgEndoError(f"model {uri}: not found in {tracking_uri} ({_first_line(err)})") from None
        metadata = (info.metadata or {}).get(METADATA_KEY)
        if not metadata:
            raise FsgEndoError(f"model {uri}: not an fsg_endo sizing model (no '{METADATA_KEY}' metadata)")
        try:
            module = mlflow.pytorch.load_model(info.model_uri)
        except MlflowException as err:
            raise FsgEndoError(f"model {uri}: cannot load ({_first_line(err)})") from None
    return LoadedModel(module=InferenceModule(module), metadata=dict(metadata), run_id=info.run_id, uri=uri)


MODEL_STAGES = ("none", "staging", "production", "archived")  # MLflow's legacy stages: models:/<name>/<stage>


def registry_uri(uri: str) -> str:
    """``models:/<name>/<alias>`` as MLflow's ``models:/<name>@<alias>``; versions, stages and others as they are."""
    name, _, last = uri.removeprefix("models:/").rpartition("/")
    if uri.startswith("models:/") and name and last and not last.isdigit() and last.lower() not in MODEL_STAGES:
        return f"models:/{name}@{last}"
    return uri


def logged_model_source(uri: str, tracking_uri: str) -> tuple[str, str]:
    """The ``models:/<model id>`` a ``models:/...`` or ``runs:/<id>/<name>`` URI names now, and a line saying
    where it came from (the URI, the model id, its run)."""
    with global_store(tracking_uri):
        try:
            info = mlflow.models.get_model_info(resolve_model_uri(registry_uri(uri), mlflow.MlflowClient(tracking_uri)))
        except (MlflowException, OSError) as err:
            raise FsgEndoError(f"model {uri}: not found in {tracking_uri} ({_first_line(err)})") from None
    return info.model_uri, f"{uri} = {info.model_uri} of run {info.run_id}"


def logged_model_tensors(model_uri: str, tracking_uri: str) -> dict[str, Any]:
    """The parameters and buffers of a logged model (e.g. ``vit.conv_proj.weight`` of a sizing model), by
    their names in the model that was logged; a pt2 model loads without pickle."""
    import mlflow.pytorch

    with global_store(tracking_uri):
        try:
            module = mlflow.pytorch.load_model(model_uri)
        except (MlflowException, OSError) as err:
            raise FsgEndoError(f"model {model_uri}: cannot load ({_first_line(err)})") from None
    return {name: tensor.detach().cpu().clone() for name, tensor in module.state_dict().items()}


def download_run_artifact(uri: str, tracking_uri: str, dst: Path) -> Path:
    """The artifact ``runs:/<run id>/<path>`` downloaded into the folder ``dst``; returns its local path."""
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=tracking_uri)
    except (MlflowException, OSError) as err:
        raise FsgEndoError(f"artifact {uri}: not found in {tracking_uri} ({_first_line(err)})") from None
    return Path(local)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__
