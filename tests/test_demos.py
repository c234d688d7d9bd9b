"""Demos (MNIST / digits fallback, Imagenette, CIFAR-100): readers on hand-written files, weights, round trips."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits as sk_digits
from torchvision.models.vision_transformer import VisionTransformer

from fsg_endo.data.image_folders import (
    IMAGENETTE_NAMES,
    load_cifar100,
    load_image_folder,
    load_mnist,
    stratified_subset,
)
from fsg_endo.experiment.demo import DEMOS, _optimizers, augment, build_demo_model, load_demo, with_weights_architecture
from fsg_endo.experiment.demo_cli import inference_main, training_main
from fsg_endo.errors import FsgEndoError

REPO = Path(__file__).resolve().parents[1]
DEMO_DIR = REPO / "experiments" / "demos"
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]  # RGB of the tiny ImageFolder classes


# -- datasets written by hand -------------------------------------------------------------------
def write_idx(path: Path, array: np.ndarray) -> None:
    """An MNIST idx file (big-endian header: 0, 0, type 0x08 = uint8, number of dims; then the dims)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, n_train: int = 40, n_test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """torchvision's raw MNIST layout with random 28x28 images; returns what was written."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        out[f"{prefix}_images"], out[f"{prefix}_labels"] = images, labels
    return out


def write_image_folder(root: Path, per_class: tuple[int, int] = (8, 4), size: int = 40) -> list[str]:
    """train/ and val/ with one folder per class (Imagenette ids), solid-colour PNGs; returns the class ids."""
    wnids = sorted(IMAGENETTE_NAMES)[:3]
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class):
        for wnid, rgb in zip(wnids, COLOURS):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                height = size + int(rng.integers(0, 20))  # non-square, as in imagenette2-160
                image = np.zeros((height, size, 3), np.uint8) + np.array(rgb[::-1], np.uint8)  # BGR for OpenCV
                cv2.imwrite(str(folder / f"{wnid}_{i}.png"), image)
    return wnids


def write_cifar100(root: Path, n_train: int = 60, n_test: int = 30, n_classes: int = 100) -> dict[str, np.ndarray]:
    """torchvision's cifar-100-python/{train,test,meta} pickles; returns the data written."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    out = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [i % 4 for i in range(n)]  # 4 of the 100 classes appear
        entry = {"filenames": [f"img_{i}.png" for i in range(n)], "batch_label": name, "fine_labels": labels,
                 "coarse_labels": [0] * n, "data": data}
        (folder / name).write_bytes(pickle.dumps(entry))
        out[f"{name}_data"], out[f"{name}_labels"] = data, np.array(labels)
    meta = {"fine_label_names": [f"class_{k:03d}" for k in range(n_classes)], "coarse_label_names": ["all"]}
    (folder / "meta").write_bytes(pickle.dumps(meta))
    return out


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


def test_augment_translates_within_shift_and_flips():
    image = torch.zeros(64, 3, 9, 9)
    image[:, :, 4, 2] = 1.0  # one bright pixel left of centre
    out = augment(image, shift=2, flip=True, generator=torch.Generator().manual_seed(0))
    ys, xs = zip(*[divmod(int(o[0].argmax()), 9) for o in out])
    assert all(o[0].sum() == 1 for o in out)  # moved, not smeared
    assert set(ys) <= {2, 3, 4, 5, 6} and len(set(ys)) > 1
    assert {x for x in xs if x <= 4} <= {0, 1, 2, 3, 4} and any(x >= 4 for x in xs)  # some mirrored to the right
    assert torch.equal(augment(image, 0, False, torch.Generator()), image)


# -- local weights ------------------------------------------------------------------------------
def _tiny_vit() -> VisionTransformer:
    torch.manual_seed(5)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=96,
                             num_classes=7)


def _timm_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A torchvision ViT state dict renamed the way timm stores it (written here, independently)."""
    out = {"cls_token": state["class_token"], "pos_embed": state["encoder.pos_embedding"],
           "patch_embed.proj.weight": state["conv_proj.weight"], "patch_embed.proj.bias": state["conv_proj.bias"],
           "norm.weight": state["encoder.ln.weight"], "norm.bias": state["encoder.ln.bias"]}
    parts = {"ln_1": "norm1", "self_attention.in_proj_weight": "attn.qkv.weight",
             "self_attention.in_proj_bias": "attn.qkv.bias", "self_attention.out_proj": "attn.proj", "ln_2": "norm2",
             "mlp.0": "mlp.fc1", "mlp.3": "mlp.fc2"}
    for key, value in state.items():
        if key.startswith("encoder.layers."):
            _, _, block, rest = key.split(".", 3)
            for tv, timm in parts.items():
                if rest.startswith(tv):
                    out[f"blocks.{block.rsplit('_', 1)[1]}.{timm}{rest[len(tv):]}"] = value
    return out


@pytest.mark.parametrize("flavour", ["torchvision", "timm"])
def test_weights_set_the_architecture_and_are_loaded(tmp_path, flavour):
    vit = _tiny_vit()
    state = vit.state_dict() if flavour == "torchvision" else {"model": _timm_names(vit.state_dict())}
    path = tmp_path / "vit.pth"
    torch.save(state, path)
    cfg = with_weights_architecture(replace(DEMOS["mnist"], weights=str(path)))
    assert (cfg.hidden_dim, cfg.depth, cfg.mlp_dim, cfg.patch_size, cfg.image_size) == (64, 2, 96, 8, 32)
    model = build_demo_model(cfg, n_classes=10)
    own = model.state_dict()
    assert torch.equal(own["conv_proj.weight"], vit.state_dict()["conv_proj.weight"])
    assert torch.equal(own["encoder.layers.encoder_layer_1.mlp.3.weight"],
                       vit.state_dict()["encoder.layers.encoder_layer_1.mlp.3.weight"])
    assert model.heads.head.out_features == 10  # a new head for the demo's classes
    main, _, _ = _optimizers(cfg, model, total_steps=10)
    assert main.param_groups[0]["initial_lr"] == cfg.finetune_lr != cfg.lr  # fine-tuning: the small backbone rate


def test_weights_that_are_not_a_vit_are_one_clear_error(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(2, 3, 3, 3)}, path)
    with pytest.raises(FsgEndoError, match="not a ViT checkpoint"):
        with_weights_architecture(replace(DEMOS["mnist"], weights=str(path)))


# -- command lines: train -> checkpoint -> inference ----------------------------------------------
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
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                              order_by=["attributes.start_time DESC"])
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
    assert Path("checkpoints/fsg_vit_mnist_demo.pth").is_file()
    ckpt = torch.load("checkpoints/fsg_vit_mnist_demo.pth", map_location="cpu", weights_only=True)
    assert ckpt["source"] == "sklearn_digits" and ckpt["class_names"] == [str(d) for d in range(10)]

    client, run = _finished_run(store, "demo_mnist")
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert tags["data.source"] == "sklearn_digits" and tags["data.fallback"] == "sklearn_digits"
    assert tags["regularizer"] == "fsg_gr" and params["data.source_read"] == "sklearn_digits"
    assert params["gr.enabled"] == "True" and params["epochs"] == "1"
    for name in ("train/loss", "train/gate_loss", "train/epoch_loss", "test/accuracy", "test/macro_f1",
                 "gates/all/mean", "gates/attn/layer_00/sparsity", "gates/mlp/layer_01/mean"):
        assert name in metrics, name
    files = _artifact_paths(client, run.info.run_id)
    assert {"gates/epoch_001.npz", "plots/gates_epoch_001.png", "predictions/test.csv", "plots/confusion_test.png",
            "plots/learning_curves.png", "checkpoint/fsg_vit_mnist_demo.pth"} <= files

    # inference (gates folded, checkpoint read back) reproduces the accuracy measured in training
    assert "digits_" in inferred and _printed_accuracy(inferred) == pytest.approx(metrics["test/accuracy"], abs=1e-4)
    assert len([ln for ln in inferred.splitlines() if ln.strip().startswith("digits_")]) == 3


def test_mnist_demo_reads_on_disk_mnist(workdir, store, capsys):
    write_mnist(workdir / "data")
    trained, inferred = _round_trip("mnist", ["--checkpoint", "m.pth"], capsys, ["--checkpoint", "m.pth"])
    assert "sklearn" not in trained and "source: mnist" in trained
    assert "mnist_test_" in inferred
    _, run = _finished_run(store, "demo_mnist")
    assert run.data.tags["data.source"] == "mnist" and run.data.tags["data.fallback"] == "none"


def test_imagenette_demo_round_trip(workdir, store, capsys):
    write_image_folder(workdir / "imagenette")
    trained, inferred = _round_trip("imagenette", ["--data-root", "imagenette", "--epochs", "2"], capsys)
    assert "epoch  2/2" in trained
    client, run = _finished_run(store, "demo_imagenette")
    assert run.data.params["epochs"] == "2" and "test/f1_tench" in run.data.metrics
    assert "gates/epoch_002.npz" in _artifact_paths(client, run.info.run_id)
    assert "val/n0" in inferred and _printed_accuracy(inferred) == pytest.approx(run.data.metrics["test/accuracy"],
                                                                                abs=1e-4)


def test_cifar100_demo_round_trip_reads_the_yaml(workdir, store, capsys):
    write_cifar100(workdir / "cifar")
    trained, inferred = _round_trip("cifar100", ["--data-root", "cifar", "--set", "seed=3"], capsys)
    client, run = _finished_run(store, "cifar100_fsg")
    params = run.data.params
    assert params["task"] == "image_class" and params["data.source"] == "cifar100" and params["seed"] == "3"
    assert params["model.patch_size"] == "4" and params["epochs"] == params["optim.epochs"] == "2"  # YAML + smoke
    assert params["data.root"] == params["data_root"] == "cifar"  # flags become config overrides
    assert "plots/confusion_test.png" not in _artifact_paths(client, run.info.run_id)  # 100 classes: no plot
    assert "cifar100_test_" in inferred
    assert _printed_accuracy(inferred) == pytest.approx(run.data.metrics["test/accuracy"], abs=1e-4)


def test_demo_fine_tunes_from_local_weights(workdir, store, capsys):
    torch.save(_tiny_vit().state_dict(), "vit.pth")
    assert training_main("mnist", ["--smoke", "--weights", "vit.pth", "--checkpoint", "ft.pth"]) == 0
    assert "32 px" in capsys.readouterr().out  # digits upsampled to a size the 8 px patches tile
    model, cfg, ckpt = load_demo("ft.pth")
    assert (cfg.hidden_dim, cfg.depth, cfg.patch_size) == (64, 2, 8) and ckpt["fine_tuned_from"] == "vit.pth"
    assert isinstance(model, VisionTransformer) and model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    _, run = _finished_run(store, "demo_mnist")
    assert run.data.tags["fine_tuned_from"] == "vit.pth"


def test_script_reports_missing_data_in_one_line(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'scripts.db'}"}
    proc = subprocess.run([sys.executable, str(DEMO_DIR / "demo_training_imnet.py"), "--data-root", "missing"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing: no ImageFolder dataset" in lines[0] and "imagenette2-160" in lines[0]
    assert not (tmp_path / "scripts.db").exists()  # missing data is found before an MLflow run starts


@pytest.mark.parametrize("main, dataset, args, expected", [
    (training_main, "cifar100", ["--data-root", "missing"], "cifar-100-python"),
    (training_main, "imagenette", ["--data-root", "missing", "--smoke"], "imagenette2-160"),
    (inference_main, "mnist", ["--checkpoint", "missing.pth"], "no demo checkpoint"),
    (inference_main, "imagenette", ["--checkpoint", "ckpt.pth", "--data-root", "missing"], "imagenette2-160"),
])
def test_missing_data_is_exit_code_2_and_one_line(workdir, capsys, main, dataset, args, expected):
    if "ckpt.pth" in args:  # a valid checkpoint whose images are gone
        write_image_folder(workdir / "imagenette")
        assert training_main("imagenette", ["--smoke", "--data-root", "imagenette", "--checkpoint", "ckpt.pth"]) == 0
        capsys.readouterr()
    assert main(dataset, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and err[0].startswith(f"demo_{main.__name__.split('_')[0]}_")


def test_load_demo_refuses_other_checkpoints(tmp_path):
    torch.save({"model": {}}, tmp_path / "other.pth")
    with pytest.raises(FsgEndoError, match="not a fsg_endo demo checkpoint"):
        load_demo(tmp_path / "other.pth")


def test_run_py_points_cifar100_fsg_to_the_demo_script(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'run.db'}", "FSG_ENDO_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "run.py"), "--exp", "cifar100_fsg"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "demo_training_cifar100.py" in lines[0]
