"""Shared pytest fixtures: the repo on sys.path, a small demo dataset, the real reference files."""
from __future__ import annotations

import importlib
import importlib.util
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT.parent / "shared" / "reference"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def load_stage(name: str):
    """Import a numbered stage (e.g. '04_train_fracture_ddp') as a module, without running it."""
    return importlib.import_module(name)


def load_make_demo():
    spec = importlib.util.spec_from_file_location("make_demo", ROOT / "data" / "make_demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_demo"] = module  # its worker pool pickles functions by module name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The real GRAZPEDWRI-DX and RSNA label files; tests that need them skip without ../shared."""
    if not (REFERENCE / "grazpedwri_dx_metadata.csv").is_file():
        pytest.skip("../shared/reference is absent")
    return REFERENCE


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory) -> Path:
    """A small demo of both datasets (session-wide): <dir>/grazpedwri and <dir>/rsna_boneage."""
    out = tmp_path_factory.mktemp("demo")
    load_make_demo().main(["--out", str(out), "--wrist-patients", "160", "--boneage-images", "120",
                           "--seed", "0"])
    return out


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
    out = tmp_path_factory.mktemp("demo_splits")
    flags = ["--data", str(small_demo / "grazpedwri"), "--boneage-data", str(small_demo / "rsna_boneage"),
             "--out", str(out), "--preset", "demo"]
    load_stage("01_split_test").main([*flags, "--per-cell", "2"])
    load_stage("02_split_trainval").main(flags)
    cache = tmp_path_factory.mktemp("image_cache")
    return DemoSplits(out, cache)


def cr_dicom() -> Path:
    """A real CR radiograph (MONOCHROME1, ViewPosition AP) shipped offline by pydicom-data.

    Found through data_store, not pydicom.data.get_testdata_files, which tries the network.
    """
    data_store = pytest.importorskip("data_store")
    path = Path(data_store.__file__).parent / "data" / "RG3_UNCR.dcm"
    if not path.is_file():
        pytest.skip("pydicom-data's RG3_UNCR.dcm is absent")
    return path
