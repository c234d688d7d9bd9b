"""Demos (MNIST / digits fallback, Imagenette, CIFAR-100): readers on hand-written files, weights, round trips
through the experiment runner (train) and the run folder (infer)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pytest
import torch
from fixtures_images import COLOURS, write_cifar100, write_image_folder, write_mnist
from sklearn.datasets import load_digits as sk_digits
from torchvision.models.vision_transformer import VisionTransformer

from fsg_endo.data.cifar100 import load_cifar100
from fsg_endo.data.image_folders import (
    IMAGENETTE_NAMES,
    load_image_folder,
    load_mnist,
    stratified_subset,
)
from fsg_endo.data.transforms import ShiftFlipd
from fsg_endo.errors import FsgEndoError
from fsg_endo.experiment.config import dump_config, load_config
from fsg_endo.experiment.demos import FINETUNE_LR, find_model, inference_main, load_trained, training_main
from fsg_endo.nn.models import vit_shape

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / "experiments" / "demos"


# -- readers ------------------------------------------------------------------------------------
def test_mnist_missing_falls_back_to_sklearn_digits(tmp_path):
    data = load_mnist(tmp_path / "nowhere", image_size=28, seed=0)
    assert data.source == "sklearn_digits" and "MNIST not found" in data.note and "sklearn" in data.note
    digits = sk_digits()
    assert len(data.train) + len(data.test) == len(digits.target) and len(data.test) == 360
    for split in (data.train, data.test):
        index = np.array([int(i.split("_")[1]) for i in split.ids])
        assert np.array_equal(split.labels.numpy(), digits.target[index])
        assert split.images.shape[1:] == (3, 28, 28) and split.images.dtype == torch.uint8
        assert torch.equal(split.images[:, 0], split.images[:, 2])  # grey replicated to RGB
    assert not set(data.train.ids) & set(data.test.ids)
    # upsampling keeps the picture: back at 8x8 it matches the digit (0..16 scaled to 0..255)
    small = cv2.resize(data.test.images[0, 0].numpy(), (8, 8), interpolation=cv2.INTER_AREA).astype(float)
    original = digits.images[int(data.test.ids[0].split("_")[1])] * 255 / 16
    assert np.corrcoef(small.ravel(), original.ravel())[0, 1] > 0.9
    assert np.bincount(data.test.labels.numpy()).min() >= 35  # stratified 20 %


def test_mnist_reads_torchvision_raw_files(tmp_path):
    written = write_mnist(tmp_path)
    data = load_mnist(tmp_path, image_size=28)
    assert data.source == "mnist" and data.note == ""
    assert np.array_equal(data.train.images[:, 1].numpy(), written["train_images"])
    assert np.array_equal(data.test.labels.numpy(), written["t10k_labels"])
    held_out = load_mnist(tmp_path, image_size=28, train=False)
    assert len(held_out.train) == 0 and held_out.test.ids == data.test.ids


def test_mnist_malformed_file_is_one_clear_error(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    with pytest.raises(FsgEndoError, match="MNIST"):
        load_mnist(tmp_path)


def test_image_folder_reads_imagenette_layout(tmp_path):
    wnids = write_image_folder(tmp_path)
    data = load_image_folder(tmp_path, image_size=16)
    assert data.class_names == tuple(IMAGENETTE_NAMES[w] for w in wnids)
    assert len(data.train) == 24 and len(data.test) == 12
    assert data.train.images.shape == (24, 3, 16, 16)
    for split in (data.train, data.test):
        for image, label, image_id in zip(split.images, split.labels, split.ids):
            assert image_id.split("/")[1] == wnids[label]
            assert np.allclose(image.float().mean(dim=(1, 2)).numpy(), COLOURS[label], atol=1)
    limited = load_image_folder(tmp_path, image_size=16, train_limit=6, test_limit=3)
    assert np.bincount(limited.train.labels.numpy()).tolist() == [2, 2, 2] and len(limited.test) == 3


@pytest.mark.parametrize("layout", ["empty", "no_val", "val_classes_differ"])
def test_image_folder_missing_data_names_what_to_put_where(tmp_path, layout):
    if layout != "empty":
        write_image_folder(tmp_path)
    if layout == "no_val":
        os.rename(tmp_path / "val", tmp_path / "validation")
    if layout == "val_classes_differ":
        os.rename(tmp_path / "val" / sorted(IMAGENETTE_NAMES)[0], tmp_path / "val" / "other")
    with pytest.raises(FsgEndoError) as err:
        load_image_folder(tmp_path)
    message = str(err.value)
    assert "\n" not in message and str(tmp_path) in message
    assert ("imagenette2-160" in message) if layout != "val_classes_differ" else ("differ" in message)


def test_cifar100_reads_torchvision_pickles(tmp_path):
    written = write_cifar100(tmp_path)
    data = load_cifar100(tmp_path, image_size=32)
    assert len(data.class_names) == 100 and data.class_names[3] == "class_003"
    assert np.array_equal(data.train.images.reshape(60, -1).numpy(), written["train_data"])
    assert np.array_equal(data.test.labels.numpy(), written["test_labels"])
    assert len(load_cifar100(tmp_path / "cifar-100-python").train) == 60  # the folder itself works too
    reduced = load_cifar100(tmp_path, image_size=16, fraction=0.2)
    assert reduced.train.images.shape == (12, 3, 16, 16)
    assert np.bincount(reduced.train.labels.numpy()).tolist() == [3, 3, 3, 3]


def test_cifar100_missing_and_malformed(tmp_path):
    with pytest.raises(FsgEndoError, match="cifar-100-python folder"):
        load_cifar100(tmp_path)
    write_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "test").write_bytes(b"not a pickle")
    with pytest.raises(FsgEndoError, match="test: not a CIFAR python-format file"):
        load_cifar100(tmp_path)


def test_stratified_subset_keeps_class_shares_and_is_seeded():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    keep = stratified_subset(labels, 10, seed=3)
    assert np.bincount(labels[keep]).tolist() == [5, 3, 2]
    assert np.array_equal(keep, stratified_subset(labels, 10, seed=3))
    assert not np.array_equal(keep, stratified_subset(labels, 10, seed=4))
    assert np.array_equal(stratified_subset(labels, None, 0), np.arange(100))


def test_shift_flip_translates_within_shift_and_mirrors():
    image = torch.zeros(3, 9, 9)
    image[:, 4, 2] = 1.0  # one bright pixel left of centre
    step = ShiftFlipd("image", shift=2, flip=True)
    places = []
    for seed in range(64):
        out = step.set_random_state(seed=seed)({"image": image})["image"]
        assert out.shape == image.shape and out[0].sum() == 1  # moved, not smeared
        places.append(divmod(int(out[0].argmax()), 9))
    ys, xs = zip(*places)
    assert set(ys) <= {2, 3, 4, 5, 6} and len(set(ys)) > 1
    assert set(xs) - {0, 1, 2, 3, 4} and set(xs) & {0, 1, 2, 3, 4}  # some mirrored to the right half
    assert places == [
        divmod(int(step.set_random_state(seed=s)({"image": image})["image"][0].argmax()), 9) for s in range(64)
    ]  # the seed fixes the draw
    assert torch.equal(ShiftFlipd("image")({"image": image})["image"], image)


# -- local weights ------------------------------------------------------------------------------
def _tiny_vit() -> VisionTransformer:
    torch.manual_seed(5)
    return VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=96, num_classes=7
    )


def _timm_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchvision ViT state dict renamed the way timm stores it (written here, independently)."""
    out = {
        "cls_token": state["class_token"],
        "pos_embed": state["encoder.pos_embedding"],
        "patch_embed.proj.weight": state["conv_proj.weight"],
        "patch_embed.proj.bias": state["conv_proj.bias"],
        "norm.weight": state["encoder.ln.weight"],
        "norm.bias": state["encoder.ln.bias"],
    }
    parts = {
        "ln_1": "norm1",
        "self_attention.in_proj_weight": "attn.qkv.weight",
        "self_attention.in_proj_bias": "attn.qkv.bias",
        "self_attention.out_proj": "attn.proj",
        "ln_2": "norm2",
        "mlp.0": "mlp.fc1",
        "mlp.3": "mlp.fc2",
    }
    for key, value in state.items():
        if key.startswith("encoder.layers."):
            _, _, block, rest = key.split(".", 3)
            for tv, timm in parts.items():
                if rest.startswith(tv):
                    out[f"blocks.{block.rsplit('_', 1)[1]}.{timm}{rest[len(tv) :]}"] = value
    return out


@pytest.mark.parametrize("flavour", ["torchvision", "timm"])
def test_vit_shape_reads_the_weight_file(tmp_path, flavour):
    vit = _tiny_vit()
    state = vit.state_dict() if flavour == "torchvision" else {"model": _timm_names(vit.state_dict())}
    torch.save(state, tmp_path / "vit.pth")
    assert vit_shape(tmp_path / "vit.pth") == {"hidden_dim": 64, "depth": 2, "heads": 1, "mlp_dim": 96, "patch_size": 8}


def test_weights_that_are_not_a_vit_are_one_clear_error(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(2, 3, 3, 3)}, path)
    with pytest.raises(FsgEndoError, match="not a ViT checkpoint"):
        vit_shape(path)


# -- command lines: train (experiment runner) -> run folder -> inference ---------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite MLflow store for the round trips of this module (one experiment per demo)."""
    return f"sqlite:///{tmp_path_factory.mktemp('demo_store') / 'mlflow.db'}"


@pytest.fixture
def workdir(tmp_path, monkeypatch, store):
    """A fresh working directory logging to the module's store; the demos' thread setting is undone after."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    threads = torch.get_num_threads()
    yield tmp_path
    torch.set_num_threads(threads)


def _finished_run(uri: str, experiment: str):
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id], order_by=["attributes.start_time DESC"]
    )
    assert runs and runs[0].info.status == "FINISHED"
    return client, runs[0]


def _artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, path):
        out |= _artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def _printed_accuracy(stdout: str) -> float:
    line = next(ln for ln in stdout.splitlines() if ln.startswith("held-out accuracy:"))
    return float(line.split()[2])


def _round_trip(dataset: str, train_args: list[str], capsys, infer_args: list[str] = ()) -> tuple[str, str]:
    """Train (smoke) then infer; returns both outputs after checking the exit codes."""
    assert training_main(dataset, ["--smoke", *train_args]) == 0
    trained = capsys.readouterr().out
    assert inference_main(dataset, ["--smoke", "--show", "3", *infer_args]) == 0
    return trained, capsys.readouterr().out


def test_mnist_demo_round_trip_with_digits_fallback(workdir, store, capsys):
    trained, inferred = _round_trip("mnist", ["--data-root", "no_mnist_here"], capsys)
    assert "using scikit-learn's bundled 8x8 digits" in trained
    client, run = _finished_run(store, "demo_mnist")
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert tags["data.source_read"] == "sklearn_digits" and tags["data.fallback"] == "sklearn_digits"
    assert "scikit-learn" in tags["data.note"] and params["data.source"] == "mnist"
    assert tags["regularizer"] == "fsg_gr" and params["gr.enabled"] == "True" and params["optim.epochs"] == "2"
    for name in (
        "train/loss",
        "train/gate_loss",
        "train/epoch_loss",
        "val/accuracy",
        "test/accuracy",
        "test/macro_f1",
        "test/f1_7",
        "best_epoch",
        "gates/all/mean",
        "gates/attn/layer_00/sparsity",
        "gates/mlp/layer_01/mean",
    ):
        assert name in metrics, name
    assert not [k for k in metrics if k.startswith("lesion/")]  # images have no lesion level
    files = _artifact_paths(client, run.info.run_id)
    assert {
        "gates/epoch_001.npz",
        "plots/gates_epoch_001.png",
        "predictions/test.csv",
        "plots/confusion_test.png",
        "plots/learning_curves.png",
        "config.yaml",
        "data.json",
    } <= files
    (best,) = workdir.glob("runs/*/best.pt")
    assert Path(tags["checkpoint_dir"]) == best.parent.resolve()
    # inference (gates folded, best model read back) reproduces the test accuracy of the run
    assert "digits_" in inferred and _printed_accuracy(inferred) == pytest.approx(metrics["test/accuracy"], abs=1e-4)
    assert len([ln for ln in inferred.splitlines() if ln.strip().startswith("digits_")]) == 3


def test_mnist_demo_reads_on_disk_mnist(workdir, store, capsys):
    written = write_mnist(workdir / "data")
    trained, inferred = _round_trip("mnist", ["--checkpoint", "ckpts"], capsys, ["--checkpoint", "ckpts"])
    assert "sklearn" not in trained and "mnist_test_" in inferred
    _, run = _finished_run(store, "demo_mnist")
    assert run.data.tags["data.source_read"] == "mnist" and run.data.tags["data.fallback"] == "none"
    run_dir, model_file = find_model("ckpts", "demo_mnist")
    assert model_file == run_dir / "best.pt" and run_dir.parent.name == "ckpts"
    shown = [ln.split() for ln in inferred.splitlines() if ln.strip().startswith("mnist_test_")]
    for image_id, target, *_ in shown:  # the true labels are those written
        assert int(target) == written["t10k_labels"][int(image_id.rsplit("_", 1)[1])]


def test_imagenette_demo_round_trip(workdir, store, capsys):
    write_image_folder(workdir / "imagenette")
    _, inferred = _round_trip("imagenette", ["--data-root", "imagenette", "--epochs", "2"], capsys)
    client, run = _finished_run(store, "demo_imagenette")
    assert run.data.params["optim.epochs"] == "2" and "test/f1_tench" in run.data.metrics
    assert "gates/epoch_002.npz" in _artifact_paths(client, run.info.run_id)
    assert "val/n0" in inferred and _printed_accuracy(inferred) == pytest.approx(
        run.data.metrics["test/accuracy"], abs=1e-4
    )


def test_cifar100_demo_round_trip_reads_the_yaml(workdir, store, capsys):
    write_cifar100(workdir / "cifar")
    _, inferred = _round_trip("cifar100", ["--data-root", "cifar", "--set", "seed=3"], capsys)
    client, run = _finished_run(store, "cifar100_fsg")
    params = run.data.params
    assert params["task"] == "image_class" and params["data.source"] == "cifar100" and params["seed"] == "3"
    assert params["model.patch_size"] == "4" and params["optim.epochs"] == "2"  # YAML + smoke
    assert params["data.root"] == "cifar"  # the flag became a config override
    assert "plots/confusion_test.png" in _artifact_paths(client, run.info.run_id)  # 100 classes: a picture only
    assert "cifar100_test_" in inferred
    assert _printed_accuracy(inferred) == pytest.approx(run.data.metrics["test/accuracy"], abs=1e-4)


def test_demo_fine_tunes_from_local_weights(workdir, store, capsys):
    vit = _tiny_vit()
    torch.save(vit.state_dict(), "vit.pth")
    assert training_main("mnist", ["--smoke", "--weights", "vit.pth", "--set", "tracking.plots=false"]) == 0
    _, run = _finished_run(store, "demo_mnist")
    params = run.data.params
    assert (params["model.weights"], params["model.hidden_dim"], params["model.depth"]) == ("vit.pth", "64", "2")
    assert float(params["optim.lr"]) == FINETUNE_LR
    model, cfg, _ = load_trained(*find_model("runs", "demo_mnist"))
    assert isinstance(model, VisionTransformer) and model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert cfg.model.weights is None  # inference reads the trained weights only
    trained = torch.load(next(Path("runs").glob("*/best.pt")), weights_only=True)["model"]
    for key in ("conv_proj.weight", "encoder.layers.encoder_layer_1.mlp.3.weight"):  # a few steps at 5e-5 from them
        assert torch.allclose(trained[key], vit.state_dict()[key], atol=0.01), key


def test_script_reports_missing_data_in_one_line(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'scripts.db'}"}
    proc = subprocess.run(
        [sys.executable, str(DEMO_DIR / "demo_training_imnet.py"), "--data-root", "missing"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing: no ImageFolder dataset" in lines[0] and "imagenette2-160" in lines[0]
    assert not (tmp_path / "scripts.db").exists()  # missing data is found before an MLflow run starts


@pytest.mark.parametrize(
    "main, dataset, args, expected",
    [
        (training_main, "cifar100", ["--data-root", "missing"], "cifar-100-python"),
        (training_main, "imagenette", ["--data-root", "missing", "--smoke"], "imagenette2-160"),
        (inference_main, "mnist", ["--checkpoint", "nowhere"], "no trained demo_mnist run"),
        (inference_main, "imagenette", ["--checkpoint", "ckpts", "--data-root", "missing"], "imagenette2-160"),
    ],
)
def test_missing_data_is_exit_code_2_and_one_line(workdir, capsys, main, dataset, args, expected):
    if "ckpts" in args:  # a trained run whose images are gone
        write_image_folder(workdir / "imagenette")
        assert (
            training_main(
                "imagenette",
                ["--smoke", "--data-root", "imagenette", "--checkpoint", "ckpts", "--set", "tracking.plots=false"],
            )
            == 0
        )
        capsys.readouterr()
    assert main(dataset, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and err[0].startswith(f"demo_{main.__name__.split('_')[0]}_")


def test_inference_refuses_other_checkpoints(tmp_path):
    torch.save({"model": {}}, tmp_path / "other.pth")
    with pytest.raises(FsgEndoError, match="not an image_class run folder"):
        load_trained(*find_model(tmp_path / "other.pth", "demo_mnist"))
    dump_config(load_config("demo_mnist"), tmp_path / "config.yaml")
    (tmp_path / "data.json").write_text(json.dumps({"class_names": list("0123456789")}))
    (tmp_path / "best.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FsgEndoError, match="best.pt: not an fsg_endo checkpoint readable with weights_only=True"):
        load_trained(*find_model(tmp_path, "demo_mnist"))
