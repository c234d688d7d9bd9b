"""Installed like a library: a built wheel carries the experiment configs and runs from any directory."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_runs_an_experiment_from_any_directory(tmp_path):
    src = tmp_path / "src"  # setuptools builds in the project folder: build a copy, not the checkout
    shutil.copytree(REPO / "fsg_endo", src / "fsg_endo", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next((tmp_path / "dist").glob("fsg_endo-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "fsg_endo/experiment/configs/polyp_size_fsg.yaml" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "FSG_ENDO_CACHE": str(tmp_path / "cache"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    where = subprocess.run(
        [sys.executable, "-c", "import fsg_endo.experiment.config as c; print(c.CONFIG_DIR)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(site)  # the wheel's copy, not the source tree
    out = subprocess.run(
        [sys.executable, "-m", "fsg_endo", "run", "--exp", "polyp_size_fsg", "--smoke", "--set", "optim.epochs=1"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "lesion/test" in out.stdout
