"""Shared pytest fixtures: the repo on sys.path, a small demo dataset, its splits, one trained run
of every stage, the real reference files.

The expensive fixtures are built once per test session, also when pytest-xdist runs the suite on
several workers (README's test command): the first worker to need one builds it under a file lock
in the folder all workers share, the others wait for it and read it. Tests only read them; a test
that changes a run works on its own copy.
"""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT.parent / "shared" / "reference"
for folder in (ROOT / "data", ROOT):  # the stages and common; make_demo and subtle_vs_obvious
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per xdist worker, for torch here and for the stages tests start: torch's default
    # (every core) in each of several workers oversubscribes the cores and slows all of them.
    os.environ["OMP_NUM_THREADS"] = "1"
    import common  # noqa: E402
    common.import_torch()  # as a stage does: ~3 s less start-up per worker
    import torch
    torch.set_num_threads(1)


# Order of the files for pytest-xdist (whole files per worker, handed out in this order): one
# reader of the shared trained run first, so one worker builds it while another takes the longest
# files; then the longest files (measured with --durations), readers of the run among them once
# the build is surely done (it takes less time than the two files before test_run_all); then the
# rest, other readers last. So no worker waits for the build or is left alone with a long file at
# the end. Without -n the order changes nothing.
FIRST_READER = "test_evaluation_stages.py"
LONGEST_FIRST = ["test_gpu_acceptance.py", "test_distributed.py", "test_run_all.py", "test_boneage.py",
                 "test_subtle_training.py", "test_tracks.py", "test_splits.py", "test_gradcam.py",
                 "test_hospital.py", "test_common.py"]


def pytest_collection_modifyitems(config, items):
    readers = {item.path.name for item in items if "trained_run" in getattr(item, "fixturenames", ())}

    def rank(item):
        name = item.path.name
        if name == FIRST_READER:
            return (0, "")
        if name in LONGEST_FIRST:
            return (1, f"{LONGEST_FIRST.index(name):03d}")
        return (3 if name in readers else 2, name)

    items.sort(key=rank)  # stable: a file's tests keep their order


def load_stage(name: str):
    """Import a numbered stage (e.g. '04_train_fracture_ddp') as a module, without running it."""
    return importlib.import_module(name)


def load_make_demo():
    """data/make_demo.py as the module `make_demo`: its drawing processes, started by a fork
    server, import it by that name (data/ is on sys.path for them)."""
    return importlib.import_module("make_demo")


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The real GRAZPEDWRI-DX and RSNA label files; tests that need them skip without ../shared."""
    if not (REFERENCE / "grazpedwri_dx_metadata.csv").is_file():
        pytest.skip("../shared/reference is absent")
    return REFERENCE


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder `name` that `build(folder)` fills, built once for the whole session (all xdist
    workers): a half-built folder from a failed build is never served, the next caller rebuilds."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # pytest-N/, shared by every worker's popen-gwK/
    folder, done = base / name, base / f"{name}.done"
    with FileLock(base / f"{name}.lock"):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> Path:
    """A small demo of both datasets (session-wide): <dir>/grazpedwri and <dir>/rsna_boneage."""
    return built_once(tmp_path_factory, "demo", lambda out: load_make_demo().main(
        ["--out", str(out), "--wrist-patients", "160", "--boneage-images", "120", "--seed", "0"]))


@dataclass
class DemoSplits:
    """01 + 02 run once on the small demo; tests copy the splits into an output folder of their own."""
    out: Path
    cache: Path

    def copy_to(self, target: Path) -> Path:
        """target/splits as 01/02 wrote them, and target/cache -> one image cache all tests share
        (entries are keyed by source path and file stamp, so sharing never serves stale pixels)."""
        shutil.copytree(self.out / "splits", target / "splits")
        (target / "cache").symlink_to(self.cache, target_is_directory=True)
        return target


@pytest.fixture(scope="session")
def demo_splits(small_demo, tmp_path_factory) -> DemoSplits:
    def build(out: Path) -> None:
        flags = ["--data", str(small_demo / "grazpedwri"), "--boneage-data", str(small_demo / "rsna_boneage"),
                 "--out", str(out), "--preset", "demo"]
        load_stage("01_split_test").main([*flags, "--per-cell", "2"])
        load_stage("02_split_trainval").main(flags)

    out = built_once(tmp_path_factory, "demo_splits", build)
    cache = built_once(tmp_path_factory, "image_cache", lambda folder: None)  # filled by the stages, under its own lock
    return DemoSplits(out, cache)


def run_all(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python run_all.py ARGS` from the repository root, output captured."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "run_all.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def data_flags(demo: Path) -> list[str]:
    return ["--data", str(demo / "grazpedwri"), "--boneage-data", str(demo / "rsna_boneage")]


# One small run of every stage through run_all.py: 1 epoch each at 48 px, every fracture group and
# the pooled models, MLflow tracking on 04 and 05. Tests of outputs, reruns, the report and 07 read it.
QUICK = ["--preset", "demo", "--device", "cpu",
         "--extra", "01=--per-cell 2",
         "--extra", "03=--epochs 1 --image-size 48",
         "--extra", "04=--epochs 1 --image-size 48 --bootstrap 100 --min-epoch-samples 0 --mlflow",
         "--extra", "05=--epochs 1 --image-size 48 --mlflow",
         "--extra", "06=--max-per-model 2"]


@dataclass
class TrainedRun:
    out: Path
    stdout: str

    def copy_to(self, target: Path) -> Path:
        """A copy of the run that a test may change (run_all.py skips what is up to date in it)."""
        shutil.copytree(self.out, target, symlinks=True)
        return target


@pytest.fixture(scope="session")
def trained_run(small_demo, tmp_path_factory) -> TrainedRun:
    """run_all.py on the small demo, every stage, once per session. Read it; change a copy_to()."""
    def build(out: Path) -> None:
        result = run_all(*data_flags(small_demo), "--out", str(out), *QUICK)
        (out / "run_all.log").write_text(result.stdout)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    out = built_once(tmp_path_factory, "trained_run", build)
    return TrainedRun(out, (out / "run_all.log").read_text())


def cr_dicom() -> Path:
    """A real CR radiograph (MONOCHROME1, ViewPosition AP) shipped offline by pydicom-data.

    Found through data_store, not pydicom.data.get_testdata_files, which tries the network.
    """
    data_store = pytest.importorskip("data_store")
    path = Path(data_store.__file__).parent / "data" / "RG3_UNCR.dcm"
    if not path.is_file():
        pytest.skip("pydicom-data's RG3_UNCR.dcm is absent")
    return path
