"""Backbones by name in ``model.weights``: torchvision, timm, ``runs:/`` and ``models:/`` (fsg_endo.engine.backbones).

No network: each test puts its own tiny ViT into the cache a name is read from (``$TORCH_HOME/hub/checkpoints``,
the Hugging Face hub cache under ``$HF_HOME`` with ``HF_HUB_OFFLINE=1``, a local MLflow store), and compares the
model that is built with the tensors it wrote, renamed by the test's own table.
"""

import hashlib
import os
import urllib.error
import urllib.parse
from pathlib import Path

import mlflow
import pytest
import torch
import torch.nn.functional as F
from torchvision.models import ViT_B_16_Weights
from torchvision.models.vision_transformer import VisionTransformer

from fsg_endo.cli import main
from fsg_endo.engine.backbones import fetch_backbone, fetch_backbones, local_backbone, vit_size
from fsg_endo.engine.recipe import build_for
from fsg_endo.engine.schema import Config
from fsg_endo.engine.tasks import get_task
from fsg_endo.errors import FsgEndoError
from fsg_endo.experiment.config import load_config
from fsg_endo.experiment.runs import start_run
from fsg_endo.nn.models import VIT_PRESETS, build_model
from fsg_endo.tracking.model_store import log_pt2_model

TV_WEIGHTS = "torchvision:ViT_B_16_Weights.IMAGENET1K_V1"
TV_FILE = os.path.basename(urllib.parse.urlparse(ViT_B_16_Weights.IMAGENET1K_V1.url).path)
PAPER = "vit_tiny_patch16_384.augreg_in21k_ft_in1k"
TIMM_WEIGHTS = f"timm:{PAPER}"
HUB_REPO = f"models--timm--{PAPER}"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
UNSET_SHAPE = ["model.hidden_dim=null", "model.depth=null", "model.heads=null", "model.mlp_dim=null"]


def tiny_vit_state(image: int = 16, patch: int = 8, dim: int = 32, depth: int = 2, mlp: int = 48, seed: int = 0):
    """A torchvision ViT's state dict with every tensor random (so no comparison passes by its init)."""
    torch.manual_seed(seed)
    vit = VisionTransformer(image, patch, depth, 2, dim, mlp, num_classes=5)
    with torch.no_grad():
        for tensor in vit.state_dict().values():
            tensor.normal_()
    return {k: v.clone() for k, v in vit.state_dict().items()}


def to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision ViT names as timm writes them (the test's own table)."""
    steps = [
        ("encoder.layers.encoder_layer_", "blocks."),
        ("class_token", "cls_token"),
        ("encoder.pos_embedding", "pos_embed"),
        ("conv_proj", "patch_embed.proj"),
        ("ln_1", "norm1"),
        ("ln_2", "norm2"),
        ("self_attention.in_proj_", "attn.qkv."),
        ("self_attention.out_proj", "attn.proj"),
        ("mlp.0", "mlp.fc1"),
        ("mlp.3", "mlp.fc2"),
        ("encoder.ln", "norm"),
        ("heads.head", "head"),
    ]
    out = {}
    for key, value in state.items():
        for old, new in steps:
            key = key.replace(old, new)
        out[key] = value
    return out


def config(weights: str, *overrides: str) -> Config:
    base = [f"model.weights={weights}", "regularizer=none", "model.patch_size=8", "data.image_size=16", *UNSET_SHAPE]
    return load_config("polyp_size_fsg", [*base, *overrides], smoke=True)


def built_vit(cfg: Config) -> VisionTransformer:
    task = get_task(cfg.task, cfg.loss.main_weights, cfg.loss.gate_weights)
    return build_for(cfg, task).vit


def assert_backbone_is(vit: VisionTransformer, state: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    """Every backbone tensor of ``vit`` equals the file's (the head is the task's own)."""
    own = vit.state_dict()
    keys = [k for k in state if not k.startswith("heads.") and k not in skip]
    assert keys and set(keys) <= set(own)
    for key in keys:
        torch.testing.assert_close(own[key], state[key], rtol=0, atol=0, msg=key)


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty torch, Hugging Face and fsg_endo caches in ``tmp_path``, offline, and any download an error."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FSG_ENDO_CACHE", str(tmp_path / "cache"))

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError(f"no network in tests ({url})")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path


def put_torchvision(root: Path, state: dict[str, torch.Tensor]) -> Path:
    path = root / "torch" / "hub" / "checkpoints" / TV_FILE
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return path


def put_hub(root: Path, state: dict[str, torch.Tensor]) -> Path:
    """``state`` (timm names) as ``model.safetensors`` of the paper's hub repo, in the hub cache layout."""
    safetensors = pytest.importorskip("safetensors.torch")
    repo = root / "hf" / "hub" / HUB_REPO
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    path = repo / "snapshots" / COMMIT / "model.safetensors"
    path.parent.mkdir(parents=True)
    safetensors.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_a_torchvision_name_loads_the_cached_file_and_the_vit_takes_its_shape(caches):
    state = tiny_vit_state(dim=32, depth=3, mlp=48)
    path = put_torchvision(caches, state)
    cfg = config(TV_WEIGHTS)
    assert fetch_backbone(TV_WEIGHTS, "unused").path == path
    vit = built_vit(cfg)
    assert (vit.hidden_dim, len(vit.encoder.layers), vit.mlp_dim, vit.patch_size) == (32, 3, 48, 8)
    assert (vit.hidden_dim, vit.mlp_dim) != (VIT_PRESETS["micro"]["hidden_dim"], VIT_PRESETS["micro"]["mlp_dim"])
    assert_backbone_is(vit, state)


def test_a_timm_name_loads_the_hub_cache_file(caches):
    pytest.importorskip("timm")
    state = tiny_vit_state(image=32, patch=16, dim=24, depth=2, mlp=40, seed=1)
    path = put_hub(caches, to_timm(state))
    cfg = config(TIMM_WEIGHTS, "model.patch_size=16", "data.image_size=32")
    backbone = fetch_backbone(TIMM_WEIGHTS, "unused")
    assert backbone.path.resolve() == path.resolve() and COMMIT in backbone.source and PAPER in backbone.source
    vit = built_vit(cfg)
    assert (vit.hidden_dim, len(vit.encoder.layers), vit.mlp_dim, vit.patch_size) == (24, 2, 40, 16)
    assert_backbone_is(vit, state)


@pytest.mark.parametrize(
    ("override", "named"),
    [("model.hidden_dim=64", ["model.hidden_dim = 64", "hidden_dim is 32"]), ("model.patch_size=16", ["is 8"])],
)
def test_a_config_that_contradicts_the_weights_is_one_line_naming_both(caches, override, named):
    put_torchvision(caches, tiny_vit_state(dim=32))
    cfg = config(TV_WEIGHTS, override, "data.image_size=32")
    for check in (lambda: fetch_backbones([cfg], "unused"), lambda: vit_size(cfg.model)):
        with pytest.raises(FsgEndoError) as err:
            check()
        message = str(err.value)
        assert "\n" not in message and TV_WEIGHTS in message and override.split("=")[0] in message
        assert all(part in message for part in named)


def test_tensors_a_torchvision_vit_cannot_hold_are_refused_not_dropped(caches):
    pytest.importorskip("timm")
    state = to_timm(tiny_vit_state(image=32, patch=16, dim=24, depth=2, mlp=40))
    state["blocks.1.ls1.gamma"] = torch.ones(24)  # a timm layer scale: no such tensor in a torchvision ViT
    put_hub(caches, state)
    with pytest.raises(FsgEndoError, match=r"1 tensors have no place .*blocks\.1\.ls1\.gamma"):
        fetch_backbones([config(TIMM_WEIGHTS, "model.patch_size=16", "data.image_size=32")], "unused")


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("torchvision:ViT_B_16_Weights.NOPE", "not a torchvision weights enum"),
        ("torchvision:ResNet50_Weights.IMAGENET1K_V2", "ResNet50, not of a ViT"),
        ("timm:vit_tiny_patch16_384.nope", "Invalid pretrained tag"),
        ("no/such/file.pt", "weight file not found"),
    ],
)
def test_names_that_name_no_vit_weights_are_one_line(caches, spec, problem):
    if spec.startswith("timm:"):
        pytest.importorskip("timm")
    with pytest.raises(FsgEndoError) as err:
        fetch_backbone(spec, "unused")
    assert "\n" not in str(err.value) and spec in str(err.value) and problem in str(err.value)


def test_position_embeddings_are_interpolated_bicubic_to_the_image_size(caches):
    state = tiny_vit_state(image=24, patch=8, dim=16, seed=2)  # a 3 x 3 patch grid
    put_torchvision(caches, state)
    vit = built_vit(config(TV_WEIGHTS, "data.image_size=40"))  # 5 x 5
    pos = state["encoder.pos_embedding"]
    grid = pos[:, 1:].reshape(1, 3, 3, 16).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(5, 5), mode="bicubic", align_corners=True).permute(0, 2, 3, 1).reshape(1, 25, 16)
    torch.testing.assert_close(vit.encoder.pos_embedding, torch.cat([pos[:, :1], grid], dim=1))
    assert_backbone_is(vit, state, skip=("encoder.pos_embedding",))


@pytest.mark.parametrize(
    ("spec", "folder", "file", "exp"),
    [
        (TIMM_WEIGHTS, "hf/hub", f"{HUB_REPO}/snapshots/<revision>/model.safetensors", "polyp_size_fsg"),
        (TV_WEIGHTS, "torch/hub", TV_FILE, "regularization_sweep"),  # a sweep opens no parent run either
    ],
)
def test_offline_with_an_empty_cache_is_one_line_and_the_cli_exits_2_writing_nothing(
    caches, monkeypatch, capsys, spec, folder, file, exp
):
    if spec.startswith("timm:"):
        pytest.importorskip("timm")
    with pytest.raises(FsgEndoError) as err:
        fetch_backbone(spec, "unused")
    message = str(err.value)
    assert "\n" not in message and spec in message and str(caches / folder) in message and file in message

    work = caches / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    before = sorted(caches.rglob("*"))
    args = ["run", "--exp", exp, "--smoke", "--set", f"model.weights={spec}", "--tracking-uri", uri]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and spec in lines[0] and file in lines[0]
    assert sorted(caches.rglob("*")) == before  # no store, run folder, data cache or weights written


@pytest.fixture
def store(caches):
    uri = f"sqlite:///{caches / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("backbones", artifact_location=str(caches / "artifacts"))
    return uri, client, client.create_run(experiment).info.run_id


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_runs_uri_loads_a_weight_file_among_the_runs_artifacts(caches, store, suffix):
    uri, client, run_id = store
    state = tiny_vit_state(seed=3)
    local = caches / f"vit{suffix}"
    if suffix == ".pt":
        torch.save({"model": state}, local)
    else:
        pytest.importorskip("safetensors.torch").save_file(to_timm(state), str(local))
    client.log_artifact(run_id, str(local), "backbone")
    spec = f"runs:/{run_id}/backbone/vit{suffix}"
    with pytest.raises(FsgEndoError, match="not fetched"):
        local_backbone(spec)  # nothing in the cache before the fetch
    fetched = fetch_backbone(spec, uri)
    assert fetched.path.read_bytes() == local.read_bytes() and run_id in fetched.source
    assert local_backbone(spec) == fetched  # the run reads the cache without the store
    assert_backbone_is(built_vit(config(spec)), state)


def test_a_models_uri_of_a_sizing_model_yields_its_vit_backbone(caches, store):
    uri, client, run_id = store
    torch.manual_seed(4)
    sizing = build_model(image_size=16, patch_size=8, hidden_dim=16, depth=2, heads=2, mlp_dim=24, box_features=4)
    with torch.no_grad():
        for tensor in sizing.state_dict().values():
            tensor.normal_()
    example = (torch.zeros(2, 3, 16, 16), torch.zeros(2, 4))
    log_pt2_model(uri, run_id, sizing, example, {"task": "size_regression"}, registered_model_name="bb")
    client.set_registered_model_alias("bb", "champion", "1")
    state = {k: v.clone() for k, v in sizing.vit.state_dict().items()}
    for spec in ("models:/bb/1", "models:/bb/champion", "models:/bb@champion", f"runs:/{run_id}/model"):
        fetched = fetch_backbone(spec, uri)
        assert run_id in fetched.source
        vit = built_vit(config(spec))
        assert (vit.hidden_dim, vit.mlp_dim) == (16, 24)
        assert_backbone_is(vit, state)
    # logging and reading models leave no store behind: a later run of the process logs where it is told
    assert "MLFLOW_TRACKING_URI" not in os.environ and mlflow.get_tracking_uri() != uri


def test_the_run_logs_where_its_weights_came_from_and_their_sha256(caches, store):
    uri, client, _ = store
    path = put_torchvision(caches, tiny_vit_state())
    cfg = config(TV_WEIGHTS)
    fetch_backbones([cfg], uri)
    tracker = start_run(cfg, uri)
    tracker.end()
    params = client.get_run(tracker.run_id).data.params
    assert params["model.weights_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert params["model.weights_source"] == ViT_B_16_Weights.IMAGENET1K_V1.url
    assert params["model.weights"] == TV_WEIGHTS


def test_the_paper_profile_names_the_papers_backbone_and_timms_vit_ti_loads_whole(caches):
    timm = pytest.importorskip("timm")
    cfg = load_config("polyp_size_fsg", ["regularizer=none"], profile="paper")
    assert cfg.model.weights == TIMM_WEIGHTS
    reference = timm.create_model(PAPER, pretrained=False).state_dict()  # timm's own ViT-Ti, random init
    put_hub(caches, reference)
    fetch_backbones([cfg], "unused")
    shape = {k: v for k, v in vit_size(cfg.model).items() if k != "weights"}
    assert shape == {**VIT_PRESETS["ti"], "patch_size": cfg.model.patch_size}
    own = to_timm(built_vit(cfg).state_dict())
    assert set(own) == {k for k in reference if not k.startswith("head.")}  # every tensor mapped, none left over
    for key, value in own.items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0, msg=key)
