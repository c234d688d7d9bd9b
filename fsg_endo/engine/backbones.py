"""Backbones by name: ``model.weights`` turned into a local weight file, its origin and its shape.

``model.weights`` is a local file, ``torchvision:<weights enum>`` (torchvision's weights API and its cache,
``$TORCH_HOME/hub/checkpoints``), ``timm:<model name>`` (timm's pretrained config, its Hugging Face hub
file and cache), ``runs:/<run id>/<path>`` (a weight file among a run's artifacts; a path without a weight
file suffix names a model the run logged) or ``models:/<name>/<version or alias>`` (a logged model, e.g. a
trained sizing model, whose ViT backbone is kept). The file is read by :mod:`fsg_endo.nn.weights`.

:func:`fetch_backbones` runs before a run opens and may download; inside the run, :func:`local_backbone`
reads the caches only. Files from MLflow are kept under ``$FSG_ENDO_CACHE/backbones``. The ViT's shape
follows the weights; a config key that says otherwise is an error naming both.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fsg_endo.engine.arms import ARMS
from fsg_endo.engine.schema import Config, Model
from fsg_endo.errors import FsgEndoError
from fsg_endo.io import atomic_path
from fsg_endo.nn.weights import foreign_keys, vit_shape

SHAPE_KEYS = ("patch_size", "hidden_dim", "depth", "heads", "mlp_dim")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm looks for in a hub repo, in that order
MODEL_FILE = "backbone.pt"  # a logged model's tensors, saved again only when the name points at another model
SOURCE_FILE = "source.txt"


@dataclass(frozen=True)
class Backbone:
    """A ``model.weights`` value resolved: the local file, and where it came from (URL, hub revision, run)."""

    spec: str
    path: Path
    source: str

    def sha256(self) -> str:
        digest = hashlib.sha256()
        with open(self.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()


def _missing(spec: str, folder: Path, file: str, reason: str) -> FsgEndoError:
    return FsgEndoError(f"model.weights {spec}: {reason}; expected {file} in the cache folder {folder}")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def cache_folder() -> Path:
    """Where weights fetched from MLflow are kept: ``$FSG_ENDO_CACHE/backbones`` (default ``.cache/fsg_endo``)."""
    return Path(os.environ.get("FSG_ENDO_CACHE", ".cache/fsg_endo")) / "backbones"


def hub_cache() -> Path:
    """The Hugging Face hub cache, read from the environment now (``HF_HUB_CACHE``, ``HF_HOME``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface"
    return Path(home) / "hub"


def _torchvision(spec: str, name: str, download: bool) -> Backbone:
    from torchvision.models import get_weight

    try:
        weights = get_weight(name)
    except (ValueError, KeyError, AttributeError):
        raise FsgEndoError(
            f"model.weights {spec}: not a torchvision weights enum (e.g. torchvision:ViT_B_16_Weights.IMAGENET1K_V1)"
        ) from None
    if not type(weights).__name__.startswith("ViT_"):
        raise FsgEndoError(f"model.weights {spec}: the weights of a {type(weights).__name__[:-8]}, not of a ViT")
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / os.path.basename(urllib.parse.urlparse(weights.url).path)
    if not path.is_file():
        if not download:
            raise _missing(spec, folder, path.name, "not downloaded")
        try:
            weights.get_state_dict(progress=False, check_hash=True)
        except Exception as err:  # network and hash errors come in many types
            raise _missing(spec, folder, path.name, f"cannot download {weights.url} ({_reason(err)})") from None
    return Backbone(spec, path, weights.url)


def _timm(spec: str, name: str, download: bool) -> Backbone:
    try:
        import timm
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:
        raise FsgEndoError(f"model.weights {spec}: needs timm (pip install 'fsg_endo[timm]')") from None
    try:
        pretrained = timm.models.get_pretrained_cfg(name)
    except RuntimeError as err:
        raise FsgEndoError(f"model.weights {spec}: {err}") from None
    if pretrained is None or not pretrained.hf_hub_id:
        raise FsgEndoError(f"model.weights {spec}: timm knows no Hugging Face hub weights of that name")
    repo, _, revision = pretrained.hf_hub_id.partition("@")
    files = [pretrained.hf_hub_filename] if pretrained.hf_hub_filename else list(HUB_FILES)
    cache = hub_cache()
    folder = cache / f"models--{repo.replace('/', '--')}"
    expected = f"{folder.name}/snapshots/<revision>/{files[0]}"
    for file in files:
        found = try_to_load_from_cache(repo, file, cache_dir=cache, revision=revision or None)
        if isinstance(found, str):
            return _hub_backbone(spec, repo, file, Path(found))
    if not download or _offline():
        raise _missing(spec, cache, expected, "not in the Hugging Face cache and offline (HF_HUB_OFFLINE)")
    for file in files:
        try:
            path = hf_hub_download(repo, file, revision=revision or None, cache_dir=cache)
        except EntryNotFoundError:
            continue
        except Exception as err:  # network errors of requests / httpx and the hub's own
            raise _missing(spec, cache, expected, f"cannot download from the hub ({_reason(err)})") from None
        return _hub_backbone(spec, repo, file, Path(path))
    raise _missing(spec, cache, expected, f"the hub repo {repo} has none of {', '.join(files)}")


def _hub_backbone(spec: str, repo: str, file: str, path: Path) -> Backbone:
    return Backbone(spec, path, f"hf://{repo}@{path.parent.name}/{file}")  # the snapshot folder is the commit


def _store_folder(spec: str) -> Path:
    """The cache folder of a ``runs:/`` or ``models:/`` value (its URI, quoted into folder names)."""
    scheme, _, rest = spec.partition(":/")
    return cache_folder().joinpath(scheme, *(urllib.parse.quote(part, safe="") for part in rest.split("/") if part))


def _is_run_file(spec: str) -> bool:
    return spec.startswith("runs:/") and spec.lower().endswith(WEIGHT_SUFFIXES)


def _from_store(spec: str, tracking_uri: str | None) -> Backbone:
    """A ``runs:/`` file or a logged model's tensors, from the cache or (with ``tracking_uri``) the store."""
    from fsg_endo.tracking.model_store import download_run_artifact, logged_model_source, logged_model_tensors

    folder = _store_folder(spec)
    file = folder / (Path(spec).name if _is_run_file(spec) else MODEL_FILE)
    cached = (folder / SOURCE_FILE).read_text(encoding="utf-8") if (folder / SOURCE_FILE).is_file() else None
    if tracking_uri is None:
        if cached is None or not file.is_file():
            raise _missing(spec, folder, file.name, "not fetched from the tracking store yet (fsg-endo run fetches it)")
        return Backbone(spec, file, cached)
    try:
        if _is_run_file(spec):
            source = f"{spec} in {tracking_uri}"
            if cached != source or not file.is_file():
                with tempfile.TemporaryDirectory() as tmp, atomic_path(file) as part:
                    shutil.move(download_run_artifact(spec, tracking_uri, Path(tmp)), part)
        else:
            model_uri, source = logged_model_source(spec, tracking_uri)
            if cached != source or not file.is_file():
                with atomic_path(file) as part:
                    torch.save(logged_model_tensors(model_uri, tracking_uri), part)
    except FsgEndoError as err:
        raise _missing(spec, folder, file.name, str(err)) from None
    if cached != source:
        with atomic_path(folder / SOURCE_FILE) as part:
            part.write_text(source, encoding="utf-8")
    return Backbone(spec, file, source)


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _resolve(spec: str, tracking_uri: str | None, download: bool) -> Backbone:
    scheme, _, name = spec.partition(":")
    if scheme == "torchvision":
        return _torchvision(spec, name, download)
    if scheme == "timm":
        return _timm(spec, name, download)
    if spec.startswith(("runs:/", "models:/")):
        return _from_store(spec, tracking_uri if download else None)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FsgEndoError(f"model.weights {spec}: weight file not found")
    return Backbone(spec, path, f"file {path.resolve()}")


def fetch_backbone(spec: str, tracking_uri: str) -> Backbone:
    """``model.weights`` as a local file, downloaded into its cache if it is not there yet."""
    return _resolve(spec, tracking_uri, download=True)


def local_backbone(spec: str) -> Backbone:
    """``model.weights`` as a local file already in its cache (what :func:`fetch_backbone` put there)."""
    return _resolve(spec, None, download=False)


def vit_size(model: Model) -> dict[str, Any]:
    """``build_model``'s shape keywords and ``weights`` (a local file) for a ``model`` config section.

    Without weights the section's keys as they are (null: the preset's). With weights every shape key
    follows them; a key the section sets to another value is a :class:`FsgEndoError` naming both. Heads
    are not stored in a checkpoint: a set ``heads`` is kept, an unset one is 64 channels per head.
    """
    if model.weights is None:
        return {key: getattr(model, key) for key in SHAPE_KEYS} | {"weights": None}
    backbone = local_backbone(model.weights)
    return checked_shape(model, backbone, vit_shape(backbone.path)) | {"weights": str(backbone.path)}


def checked_shape(model: Model, backbone: Backbone, weights: Mapping[str, int]) -> dict[str, int]:
    """The shape of ``weights`` (``vit_shape``), ``heads`` as the section sets it; a contradiction is an error."""
    shape = dict(weights)
    for key in SHAPE_KEYS:
        value = getattr(model, key)
        if key == "heads" and value is not None:
            shape[key] = value
        elif value is not None and value != weights[key]:
            unset = " or null" if key != "patch_size" else ""
            raise FsgEndoError(
                f"model.{key} = {value} contradicts model.weights {backbone.spec}, whose {key} is {weights[key]} "
                f"(set model.{key} to {weights[key]}{unset})"
            )
    return shape


def loaded_weights(cfg: Config) -> str | None:
    """The ``model.weights`` a run loads: None for an arm that trains no network (a baseline reads no backbone)."""
    return cfg.model.weights if ARMS[cfg.regularizer].trained else None


def fetch_backbones(configs: Iterable[Config], tracking_uri: str) -> dict[str, Backbone]:
    """Fetch the weights of every config (a run, or each child of a sweep) and check them against the configs,
    before any run opens: a missing file, a tensor the ViT cannot hold or a contradicting key writes nothing."""
    fetched: dict[str, Backbone] = {}
    shapes: dict[str, dict[str, int]] = {}
    for cfg in configs:
        spec = loaded_weights(cfg)
        if spec is None:
            continue
        if spec not in fetched:
            fetched[spec] = fetch_backbone(spec, tracking_uri)
            shapes[spec] = vit_shape(fetched[spec].path)
            foreign = foreign_keys(fetched[spec].path)
            if foreign:
                raise FsgEndoError(
                    f"model.weights {spec}: {len(foreign)} tensors have no place in a torchvision ViT "
                    f"({', '.join(foreign[:3])}): not a plain ViT (e.g. layer scale, register tokens)"
                )
        checked_shape(cfg.model, fetched[spec], shapes[spec])
    return fetched


def backbone_params(cfg: Config) -> dict[str, str]:
    """The MLflow params that say where a run's weights came from: ``model.weights_source`` and
    ``model.weights_sha256`` (of the local file loaded); none without weights."""
    spec = loaded_weights(cfg)
    if spec is None:
        return {}
    backbone = local_backbone(spec)
    return {"model.weights_source": backbone.source, "model.weights_sha256": backbone.sha256()}
