"""Shared code for the pediatric wrist radiograph pipeline.

Every numbered stage imports this one module; copy it next to any stage you reuse elsewhere.
Sections, in order:

1. Command line, errors and small file helpers (atomic writes, run config)
2. Data readers: GRAZPEDWRI-DX `dataset.csv`, RSNA bone-age CSVs, image index, splits
3. Age groups (the one definition every stage uses)
4. Images: one loader for PNG/JPEG (8/16-bit) and DICOM, letterbox, preprocess-once cache
   4b. A run's fracture models and Grad-CAM++ overlays (06 and 07)
5. Models and losses: timm factory, focal loss, GeM, bone-age model
6. Distributed: setup/teardown, DDP-aware balanced sampler, gathering predictions
7. Training loop shared by 03, 04 and 05 (resumable, early stopping, bf16 on CUDA)
8. Metrics and plots: AUC, sensitivity/specificity, patient-level bootstrap CIs, MAE, figures

Nothing here does work at import time.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import math
import os
import platform
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

# torch, timm, cv2, pydicom and matplotlib are imported inside the functions that need them, so
# `--help` and the split stages start in a fraction of a second.

ROOT = Path(__file__).resolve().parent
DEMO_WRIST_ROOT = ROOT / "data" / "demo" / "grazpedwri"
DEMO_BONEAGE_ROOT = ROOT / "data" / "demo" / "rsna_boneage"
DEFAULT_OUT = ROOT / "outputs"

PROJECTIONS = {"AP": 1, "Lat": 2}  # GRAZPEDWRI-DX codes; 3 = oblique, never modelled
DEFAULT_AGE_EDGES = (5.0, 10.0, 15.0)
BONEAGE_MAX_MONTHS = 240.0

# Input size per preset. 03 and 04 share the wrist size so they share one image cache.
IMAGE_SIZE = {"demo": 64, "full": 384}
BONEAGE_IMAGE_SIZE = {"demo": 96, "full": 512}

# Grey-level normalisation: the mean/std of ImageNet's luminance, because the full preset starts
# from ImageNet weights whose first convolution timm folds to one channel.
PIXEL_MEAN, PIXEL_STD = 0.449, 0.226


# ------------------------------------------------------------------------------------------------
# 1. Command line, errors and small file helpers
# ------------------------------------------------------------------------------------------------

class InputError(SystemExit):
    """A problem with the user's input. Raised as SystemExit so the user sees one line, no traceback.

    The message names the file, the problem and the fix. Tests catch it like any exception.
    """

    def __init__(self, message: str):
        super().__init__(f"error: {message}")


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags every stage and run_all.py share, with the same names and defaults."""
    parser.add_argument("--data", type=Path, default=None,
                        help="GRAZPEDWRI-DX-layout folder holding dataset.csv and the images "
                             f"(default: the demo, {DEMO_WRIST_ROOT.relative_to(ROOT)})")
    parser.add_argument("--boneage-data", type=Path, default=None,
                        help="RSNA bone-age folder or CSV (default: the demo, "
                             f"{DEMO_BONEAGE_ROOT.relative_to(ROOT)})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="output folder shared by all stages (default: outputs/)")
    parser.add_argument("--preset", choices=["demo", "full"], default=None,
                        help="demo: tiny models and images for a CPU; full: the original "
                             "architectures and sizes (default: demo on the demo data, else full)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where to train (default: auto = CUDA if visible)")
    parser.add_argument("--seed", type=int, default=42, help="random seed (default: 42)")
    return parser


def resolve_common_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the data and preset defaults: the demo preset goes with the demo data."""
    on_demo = args.data is None and args.boneage_data is None
    args.data = Path(args.data) if args.data is not None else DEMO_WRIST_ROOT
    args.boneage_data = Path(args.boneage_data) if args.boneage_data is not None else DEMO_BONEAGE_ROOT
    args.out = Path(args.out)
    if args.preset is None:
        args.preset = "demo" if on_demo else "full"
    return args


def make_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose --help is the stage's docstring, plus the common flags."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_common_args(parser)


def add_training_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of the training stages (03, 04, 05); None means 'take the preset's value'."""
    group = parser.add_argument_group("training")
    group.add_argument("--arch", help="timm architecture (default: per preset)")
    group.add_argument("--pretrained", help="local weights file for --arch (.safetensors/.pth), or "
                                            "'download' on an online machine (default: random init)")
    group.add_argument("--epochs", type=int, help="maximum epochs (default: per preset)")
    group.add_argument("--batch-size", type=int, help="GLOBAL batch size, split across ranks (default: per preset)")
    group.add_argument("--lr", type=float, help="peak learning rate (default: per preset)")
    group.add_argument("--patience", type=int, help="epochs without validation gain before stopping")
    group.add_argument("--image-size", type=int, help="input size in pixels (default: per preset)")
    group.add_argument("--workers", type=int, help="loader processes per rank (default: 0 on CPU, "
                                                   "where the cache makes loading nearly free; 4 on GPU)")
    group.add_argument("--compile", action="store_true", help="torch.compile the model (GPU; slow to start)")
    group.add_argument("--init-from", metavar="PATH", help="start from the best.pt/last.pt of an earlier run "
                                                           "of this stage (fine-tuning; a head of another "
                                                           "size starts fresh) (default: none)")
    return parser


def apply_training_preset(args: argparse.Namespace, presets: dict, image_size: int) -> argparse.Namespace:
    """Fill every training flag the user left out from the stage's preset table."""
    for key, value in presets[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.image_size = args.image_size or image_size
    if args.workers is None:
        import torch
        on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        args.workers = min(4, os.cpu_count() or 1) if on_gpu else 0
    return args


def log(*parts, **kwargs) -> None:
    """Print on rank 0 only, flushed, so torchrun logs stay readable."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*parts, **kwargs, flush=True)


def progress(iterable: Iterable, **kwargs):
    """A tqdm bar on rank 0; silent elsewhere."""
    from tqdm import tqdm
    quiet = int(os.environ.get("RANK", "0")) != 0
    return tqdm(iterable, disable=quiet, mininterval=1.0 if sys.stderr.isatty() else 10.0,
                dynamic_ncols=True, **kwargs)


def ensure_writable_dir(path: Path) -> Path:
    """Create `path` (and parents) and prove it is writable, or fail with one line."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise InputError(f"{path}: cannot write there ({error.strerror}); pass --out with a "
                         "folder you can write to") from None
    return path


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary name beside `path`; on success it replaces `path` in one step.

    A reader never sees a half-written file, and an interrupted write leaves the old one intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def write_json(obj, path: Path) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    return Path(path)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def _json_default(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def config_dict(args: argparse.Namespace) -> dict:
    """The resolved CLI as JSON primitives (a Path in a checkpoint breaks weights_only loading)."""
    return json.loads(json.dumps(vars(args), default=_json_default))


def library_versions() -> dict:
    """Installed versions of the libraries that shape a result (read from package metadata, so
    nothing has to be imported first)."""
    from importlib.metadata import PackageNotFoundError, version
    versions = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "timm", "numpy", "pandas", "scikit-learn", "pydicom",
                 "opencv-python-headless", "grad-cam"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


def write_run_config(folder: Path, args: argparse.Namespace, **extra) -> Path:
    """Record how a stage was run beside its outputs: command line, resolved flags, versions."""
    record = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "config": config_dict(args), "versions": library_versions(), **extra}
    return write_json(record, Path(folder) / "config.json")


def seed_everything(seed: int) -> None:
    import torch
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# 2. Data readers
# ------------------------------------------------------------------------------------------------

GRAZ_COLUMNS = ["filestem", "patient_id", "study_number", "timehash", "gender", "age",
                "laterality", "projection", "initial_exam", "ao_classification", "cast",
                "diagnosis_uncertain", "osteopenia", "fracture_visible", "metal", "pixel_spacing",
                "device_manufacturer"]
GRAZ_REQUIRED = ["filestem", "patient_id", "study_number", "gender", "age", "projection",
                 "fracture_visible", "metal", "cast", "ao_classification"]
GRAZ_FLAGS = ["initial_exam", "cast", "diagnosis_uncertain", "osteopenia", "fracture_visible", "metal"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}


def index_images(root: Path) -> dict[str, Path]:
    """Map filestem -> image path for every image anywhere under `root`, in ONE walk of the tree.

    Handles images_part1..4/, a merged images/ folder, or any hospital layout. One walk instead of
    one glob per row: 20k globs over a network share take minutes.
    """
    found: dict[str, Path] = {}
    # Absolute paths: split CSVs must stay valid for a stage started from another folder.
    for folder, _, files in os.walk(Path(root).resolve(), followlinks=True):
        for name in files:
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in IMAGE_SUFFIXES and not name.startswith("."):
                # A PNG wins over a DICOM of the same stem only by sort order; keep the first seen.
                found.setdefault(stem, Path(folder) / name)
    return found


def read_wrist_metadata(root: Path, *, projections: Sequence[str] = ("AP", "Lat"),
                        exclude_metal: bool = True, exclude_cast: bool = False,
                        ao_pattern: str | None = None, age_range: tuple[float, float] | None = None,
                        image_index: dict[str, Path] | None = None,
                        ) -> tuple[pd.DataFrame, dict[str, int]]:
    """Read GRAZPEDWRI-DX `dataset.csv` unchanged (or a hospital table: `root` is a .csv file, see
    read_hospital_table) and apply the study's filters.

    Returns the kept rows (all 17 original columns plus image_path, label, projection_name) and the
    number of rows excluded for each reason, in the order the filters ran. Counts add up:
    kept + sum(excluded) == rows in the file.

    The AO filter keeps rows with no AO code (normal wrists stay as negatives) and rows where any
    code, after splitting on ';' or ',', matches the regular expression.
    """
    root = Path(root)
    if is_hospital_table(root):
        frame, hospital_index = read_hospital_table(root)
        if ao_pattern and not frame["ao_classification"].astype(bool).any():
            raise InputError(f"{root}: --ao-filter needs an ao_classification column; add one or drop the filter")
        return _filter_wrist_rows(frame, root, image_index or hospital_index, projections=projections,
                                  exclude_metal=exclude_metal, exclude_cast=exclude_cast,
                                  ao_pattern=ao_pattern, age_range=age_range)
    csv_path = root / "dataset.csv"
    if not root.is_dir():
        raise InputError(f"{root}: data folder not found; pass --data with the GRAZPEDWRI-DX "
                         "folder (dataset.csv + images_part1..4/), or omit --data for the demo")
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: dataset.csv not found; --data must be the folder that "
                         "holds GRAZPEDWRI-DX's dataset.csv")
    try:
        # utf-8-sig strips the byte-order mark the published file starts with.
        frame = pd.read_csv(csv_path, encoding="utf-8-sig", dtype={"filestem": str,
                            "ao_classification": str, "gender": str, "laterality": str})
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as error:
        raise InputError(f"{csv_path}: not a readable CSV ({error}); export it again as "
                         "comma-separated UTF-8") from None
    missing = [c for c in GRAZ_REQUIRED if c not in frame.columns]
    if missing:
        raise InputError(f"{csv_path}: missing required column(s) {', '.join(missing)}; the file "
                         f"needs GRAZPEDWRI-DX's columns: {', '.join(GRAZ_COLUMNS)}")
    for flag in GRAZ_FLAGS:
        if flag in frame.columns:
            frame[flag] = pd.to_numeric(frame[flag], errors="coerce").fillna(0).astype(int)
    frame["age"] = pd.to_numeric(frame["age"], errors="coerce")
    frame["projection"] = pd.to_numeric(frame["projection"], errors="coerce")
    index = image_index if image_index is not None else index_images(root)
    if not index:
        raise InputError(f"{root}: no images (.png/.jpg/.dcm) found anywhere under the data "
                         "folder; unpack images_part1..4 (or images/) inside it")
    return _filter_wrist_rows(frame, csv_path, index, projections=projections, exclude_metal=exclude_metal,
                              exclude_cast=exclude_cast, ao_pattern=ao_pattern, age_range=age_range)


def _filter_wrist_rows(frame: pd.DataFrame, csv_path: Path, index: dict[str, Path], *,
                       projections: Sequence[str], exclude_metal: bool, exclude_cast: bool,
                       ao_pattern: str | None, age_range: tuple[float, float] | None,
                       ) -> tuple[pd.DataFrame, dict[str, int]]:
    """read_wrist_metadata's filters and image lookup, shared by dataset.csv and hospital tables."""
    frame["ao_classification"] = frame["ao_classification"].fillna("")
    total = len(frame)

    wanted_codes = [PROJECTIONS[name] for name in projections]
    filters: list[tuple[str, pd.Series]] = [
        ("age missing", frame["age"].isna()),
        ("oblique projection", frame["projection"] == 3),
        ("projection not selected", ~frame["projection"].isin(wanted_codes) & (frame["projection"] != 3)),
    ]
    if exclude_metal:
        filters.append(("metal implant", frame["metal"] == 1))
    if exclude_cast:
        filters.append(("cast", frame["cast"] == 1))
    if ao_pattern:
        filters.append(("AO code not matching", ~frame["ao_classification"].map(
            lambda codes: _ao_matches(codes, ao_pattern))))
    if age_range is not None:
        low, high = age_range
        filters.append(("age outside range", ~frame["age"].between(low, high, inclusive="left")))

    excluded: dict[str, int] = {}
    keep = pd.Series(True, index=frame.index)
    for reason, mask in filters:
        hit = keep & mask.fillna(False).astype(bool)
        excluded[reason] = int(hit.sum())
        keep &= ~hit

    paths = frame["filestem"].map(index)
    hit = keep & paths.isna()
    excluded["image not found"] = int(hit.sum())
    keep &= ~hit

    kept = frame[keep].copy()
    kept["image_path"] = paths[keep].map(str)
    kept["label"] = (kept["fracture_visible"] == 1).astype(int)
    kept["projection_name"] = kept["projection"].map({v: k for k, v in PROJECTIONS.items()})
    if not is_hospital_table(csv_path):  # a hospital's patient IDs may be pseudonyms, not numbers
        kept["patient_id"] = kept["patient_id"].astype(int)
    assert len(kept) + sum(excluded.values()) == total
    if len(kept) == 0:
        raise InputError(f"{csv_path}: no rows left after filtering ({format_exclusions(excluded, total)}); "
                         "check the images are under --data and the filter flags")
    return kept.reset_index(drop=True), excluded


def _ao_matches(codes: str, pattern: str) -> bool:
    parts = [c.strip() for c in re.split(r"[;,]", codes) if c.strip()]
    return not parts or any(re.search(pattern, code) for code in parts)


def format_exclusions(excluded: dict[str, int], total: int) -> str:
    """One line: 'of 20327 rows: 93 oblique projection, 708 metal implant, ...'."""
    parts = [f"{n} {reason}" for reason, n in excluded.items() if n]
    return f"of {total} rows excluded: " + (", ".join(parts) if parts else "none")


# A hospital's own table: one row per image, paths instead of GRAZPEDWRI-DX's file stems.
HOSPITAL_REQUIRED = ["image_path", "patient_id", "study_id", "age", "sex", "projection", "fracture"]
HOSPITAL_OPTIONAL = ["laterality", "cast", "metal", "ao_classification", "boneage"]
PROJECTION_NAMES = {"ap": "AP", "pa": "AP", "frontal": "AP", "1": "AP",
                    "lat": "Lat", "lateral": "Lat", "ll": "Lat", "rl": "Lat", "2": "Lat"}
SEX_NAMES = {"m": "M", "male": "M", "f": "F", "female": "F"}


def is_hospital_table(path: Path) -> bool:
    """--data given as a CSV file is a hospital table; a folder is GRAZPEDWRI-DX's layout."""
    return Path(path).suffix.lower() == ".csv"


def read_table_csv(csv_path: Path) -> pd.DataFrame:
    """Any user CSV as strings, header names stripped and lower-cased, byte-order mark dropped."""
    try:
        table = pd.read_csv(csv_path, dtype=str, encoding="utf-8-sig", keep_default_na=False)
    except FileNotFoundError:
        raise InputError(f"{csv_path}: file not found") from None
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as error:
        raise InputError(f"{csv_path}: not a readable CSV ({error}); export it again as "
                         "comma-separated UTF-8") from None
    table.columns = [str(c).strip().lower() for c in table.columns]
    return table.apply(lambda column: column.str.strip())


def resolve_table_path(csv_path: Path, given: str) -> Path:
    """An image path of a table: absolute, or relative to the table's own folder (not the cwd)."""
    path = Path(given)
    # normpath, not resolve(): '..' steps are folded, a folder of symlinked images stays as given.
    return Path(os.path.normpath(path if path.is_absolute() else Path(csv_path).resolve().parent / path))


def read_hospital_table(csv_path: Path) -> tuple[pd.DataFrame, dict[str, Path]]:
    """A hospital table as GRAZPEDWRI-DX's columns, so 01-06 and their checks run on it unchanged.

    Columns: image_path, patient_id, study_id, age (years), sex (M/F), projection (AP/Lat),
    fracture (0/1); optional laterality (L/R), cast, metal (0/1), ao_classification. Returns the
    frame in dataset.csv's layout (plus study_id and sex) and {filestem: image path} of the files
    that exist. The filestem is the image path made file-name safe: 04's predictions and 06's
    overlays are keyed and named by it. Values the reader cannot use become NaN and are counted by
    read_wrist_metadata's filters (age missing, projection not selected, ...), never guessed.
    """
    table = read_table_csv(csv_path)
    missing = [c for c in HOSPITAL_REQUIRED if c not in table.columns]
    if missing:
        raise InputError(f"{csv_path}: missing column(s) {', '.join(missing)}; a hospital table needs "
                         f"{', '.join(HOSPITAL_REQUIRED)} (optional: {', '.join(HOSPITAL_OPTIONAL)})")
    if table.empty:
        raise InputError(f"{csv_path}: no rows; one row per image is needed")
    fracture = table["fracture"].map({"0": 0, "1": 1, "0.0": 0, "1.0": 1})
    if fracture.isna().any():
        row = int(np.flatnonzero(fracture.isna())[0])
        raise InputError(f"{csv_path}: fracture {table['fracture'].iloc[row]!r} on data row {row + 1}; "
                         "the label must be 0 or 1 on every row")
    stems = table["image_path"].map(_filestem_of_path)
    if stems.duplicated().any():
        raise InputError(f"{csv_path}: image {table['image_path'][stems.duplicated()].iloc[0]!r} is "
                         "listed twice; one row per image")
    projection = table["projection"].str.lower().map(PROJECTION_NAMES).map(PROJECTIONS)
    projection[table["projection"].str.lower().isin(["oblique", "obl", "3"])] = 3  # counted as oblique
    frame = pd.DataFrame({
        "filestem": stems, "patient_id": table["patient_id"], "study_number": table["study_id"],
        "study_id": table["study_id"], "timehash": 0,
        "gender": table["sex"].str.lower().map(SEX_NAMES).fillna("O"),
        "age": pd.to_numeric(table["age"], errors="coerce"),
        "laterality": table.get("laterality", pd.Series("", index=table.index)).str.upper(),
        # An unknown projection text is code 0, which the projection filter counts and drops.
        "projection": projection.fillna(0).astype(int),
        "initial_exam": 0, "ao_classification": table.get("ao_classification", ""),
        "cast": _flag_column(table, "cast", csv_path), "diagnosis_uncertain": 0, "osteopenia": 0,
        "fracture_visible": fracture.astype(int), "metal": _flag_column(table, "metal", csv_path),
        "pixel_spacing": np.nan, "device_manufacturer": ""})
    frame["sex"] = frame["gender"]
    if frame["patient_id"].eq("").any() or frame["study_id"].eq("").any():
        raise InputError(f"{csv_path}: empty patient_id or study_id; every image needs both (splits "
                         "keep a patient's images together, studies are scored as a whole)")
    paths = table["image_path"].map(lambda given: resolve_table_path(csv_path, given))
    index = {stem: path for stem, path in zip(stems, paths) if path.is_file()}
    return frame, index


def _filestem_of_path(given: str) -> str:
    """'ward3/2024/IM0001.dcm' -> 'ward3__2024__IM0001': unique per path and safe as a file name."""
    without_suffix = re.sub(r"\.(png|jpe?g|dcm|dicom)$", "", given.strip().strip("/"), flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", without_suffix.replace("/", "__").replace("\\", "__"))


def _flag_column(table: pd.DataFrame, name: str, csv_path: Path) -> pd.Series:
    """An optional 0/1 column (empty = 0); any other value is an error, not a silent 0."""
    if name not in table.columns:
        return pd.Series(0, index=table.index)
    values = table[name].replace("", "0").map({"0": 0, "1": 1, "0.0": 0, "1.0": 1})
    if values.isna().any():
        raise InputError(f"{csv_path}: {name} {table[name][values.isna()].iloc[0]!r}; write 0, 1 or leave it empty")
    return values.astype(int)


# 07's CSV column -> its images column; every one optional (a hospital table has them all).
PREDICTION_CSV_COLUMNS = {"study_id": "study_id", "patient_id": "patient_id", "laterality": "csv_laterality",
                          "projection": "csv_projection", "age": "csv_age", "sex": "csv_sex",
                          "fracture": "label", "boneage": "boneage"}


def collect_prediction_inputs(inputs: Sequence[Path]) -> pd.DataFrame:
    """07's inputs (folders, CSVs, image files) as one row per image: input_path as given, path to
    read, and the CSV's own values (PREDICTION_CSV_COLUMNS, None where not given)."""
    rows = []
    for item in inputs:
        if item.is_dir():
            rows += [{"input_path": str(path)} for path in _images_under(item)]
        elif item.suffix.lower() == ".csv" and item.is_file():
            rows += _prediction_rows_from_csv(item)
        elif item.is_file():
            rows.append({"input_path": str(item)})
        else:
            raise InputError(f"{item}: no such folder, CSV or image file")
    if not rows:
        raise InputError(f"{', '.join(map(str, inputs))}: no images found (.png/.jpg/.jpeg/.dcm)")
    frame = pd.DataFrame(rows, columns=["input_path", "path", *PREDICTION_CSV_COLUMNS.values()])
    frame["path"] = frame["path"].fillna(frame["input_path"]).map(Path)
    return frame.astype(object).where(frame.notna(), None)


def _images_under(folder: Path) -> list[Path]:
    found = []
    for parent, _, names in os.walk(folder, followlinks=True):
        for name in names:
            path = Path(parent) / name
            if name.startswith("."):
                continue
            # Hospital exports often name DICOM files without an extension (IM000001).
            if path.suffix.lower() in IMAGE_SUFFIXES or (not path.suffix and is_dicom(path)):
                found.append(path)
    return sorted(found)


def _prediction_rows_from_csv(csv_path: Path) -> list[dict]:
    table = read_table_csv(csv_path)
    path_column = next((c for c in ("image_path", "path") if c in table.columns), None)
    if path_column is None:
        raise InputError(f"{csv_path}: no `image_path` (or `path`) column; the CSV needs one "
                         f"image path per row, plus optional {', '.join(PREDICTION_CSV_COLUMNS)}")
    table = table[table[path_column] != ""]
    _check_prediction_labels(table, csv_path)
    return [{"input_path": record[path_column],
             "path": str(resolve_table_path(csv_path, record[path_column])),
             **{column: record.get(name) or None for name, column in PREDICTION_CSV_COLUMNS.items()}}
            for record in table.to_dict("records")]


def _check_prediction_labels(table: pd.DataFrame, csv_path: Path) -> None:
    """Labels are scored, so a bad one is an error, not a skip; scoring needs patients and studies."""
    if "fracture" in table and not table["fracture"].isin(["0", "1"]).all():
        bad = table.loc[~table["fracture"].isin(["0", "1"]), "fracture"].iloc[0]
        raise InputError(f"{csv_path}: fracture {bad!r}; the label must be 0 or 1 on every row")
    if "boneage" in table and pd.to_numeric(table["boneage"], errors="coerce").isna().any():
        raise InputError(f"{csv_path}: a boneage value is not a number of months; fill every row")
    needed = ["patient_id", "study_id"] if "fracture" in table else ["patient_id"] if "boneage" in table else []
    missing = [c for c in needed if c not in table or table[c].eq("").any()]
    if missing:
        raise InputError(f"{csv_path}: labels but no {' and '.join(missing)} on every row; the "
                         "evaluation resamples patients and scores studies")


# RSNA bone age: three published CSV variants, mapped to id / boneage / male.
BONEAGE_COLUMN_NAMES = {
    "id": "id", "image id": "id", "case id": "id",
    "boneage": "boneage", "bone age (months)": "boneage", "ground truth bone age (months)": "boneage",
    "male": "male", "sex": "sex",
}
BONEAGE_CSV_NAMES = ["boneage-training-dataset.csv", "boneage-validation-dataset.csv",
                     "boneage-test-dataset.csv"]


def find_boneage_csv(path: Path) -> Path:
    """`path` is a CSV, or a folder holding the training CSV (or exactly one CSV)."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise InputError(f"{path}: bone-age data not found; pass --boneage-data with the RSNA "
                         "folder or one of its CSVs, or omit it for the demo")
    for name in BONEAGE_CSV_NAMES:
        if (path / name).is_file():
            return path / name
    csvs = sorted(path.glob("*.csv"))
    if len(csvs) == 1:
        return csvs[0]
    raise InputError(f"{path}: no boneage-training-dataset.csv here ({len(csvs)} other CSVs); "
                     "pass the CSV itself with --boneage-data")


def read_boneage_metadata(path: Path, image_index: dict[str, Path] | None = None,
                          ) -> tuple[pd.DataFrame, dict[str, int]]:
    """Read any of the three RSNA bone-age CSV variants; find images by id under the CSV's folder.

    Returns columns id (str), boneage (months, float), male (bool), sex ('M'/'F'), image_path,
    and the rows excluded by reason.
    """
    csv_path = find_boneage_csv(path)
    try:
        frame = pd.read_csv(csv_path, encoding="utf-8-sig", dtype=str)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as error:
        raise InputError(f"{csv_path}: not a readable CSV ({error})") from None
    frame = frame.rename(columns={c: BONEAGE_COLUMN_NAMES.get(c.strip().lower(), c) for c in frame.columns})
    if "sex" in frame.columns and "male" not in frame.columns:
        frame["male"] = frame["sex"].str.strip().str.upper().map({"M": "true", "F": "false"})
    missing = [c for c in ("id", "boneage", "male") if c not in frame.columns]
    if missing:
        raise InputError(f"{csv_path}: missing column(s) {', '.join(missing)}; expected one of the "
                         "RSNA layouts: id,boneage,male | Image ID,male,Bone Age (months) | "
                         "Case ID,Sex,Ground truth bone age (months)")
    total = len(frame)
    frame["id"] = frame["id"].str.strip()
    frame["boneage"] = pd.to_numeric(frame["boneage"], errors="coerce")
    frame["male"] = frame["male"].astype(str).str.strip().str.lower().map(
        {"true": True, "false": False, "1": True, "0": False, "m": True, "f": False})
    excluded = {"bone age missing": 0, "sex missing": 0, "image not found": 0}
    keep = pd.Series(True, index=frame.index)
    for reason, mask in (("bone age missing", frame["boneage"].isna()),
                         ("sex missing", frame["male"].isna())):
        excluded[reason] = int((keep & mask).sum())
        keep &= ~mask
    index = image_index if image_index is not None else index_images(csv_path.parent)
    paths = frame["id"].map(index)
    excluded["image not found"] = int((keep & paths.isna()).sum())
    keep &= paths.notna()
    kept = frame[keep].copy()
    if kept.empty:
        raise InputError(f"{csv_path}: no usable rows ({format_exclusions(excluded, total)}); the "
                         "images must lie under the CSV's folder as <id>.png")
    kept["male"] = kept["male"].astype(bool)
    kept["sex"] = np.where(kept["male"], "M", "F")
    kept["image_path"] = paths[keep].map(str)
    columns = ["id", "boneage", "male", "sex", "image_path"]
    return kept[columns].reset_index(drop=True), excluded


def split_path(out: Path, dataset: str, split: str) -> Path:
    return Path(out) / "splits" / f"{dataset}_{split}.csv"


def read_split(out: Path, dataset: str, split: str) -> pd.DataFrame:
    """Read a split CSV written by 01/02, or say which stage to run first."""
    path = split_path(out, dataset, split)
    if not path.is_file():
        stage = "01_split_test.py" if split in ("test", "quarantine") else "02_split_trainval.py"
        raise InputError(f"{path}: split not found; run {stage} (or run_all.py) with the same --out first")
    frame = pd.read_csv(path, dtype={"filestem": str, "id": str, "ao_classification": str})
    return frame


def patient_overlap(splits: dict[str, pd.DataFrame], key: str = "patient_id") -> dict[str, int]:
    """Number of patients shared by each pair of splits, e.g. {'test/train': 0, ...}.

    All zeros is the leak check: an image of a test patient in training would let the model
    recognise the patient instead of the fracture, and inflate every test metric.
    """
    names = list(splits)
    return {f"{a}/{b}": len(set(splits[a][key]) & set(splits[b][key]))
            for i, a in enumerate(names) for b in names[i + 1:]}


def assert_no_patient_leak(splits: dict[str, pd.DataFrame], key: str = "patient_id") -> None:
    shared = {pair: n for pair, n in patient_overlap(splits, key).items() if n}
    if shared:
        raise InputError(f"patients shared between splits {shared}; the split CSVs under "
                         "outputs/splits/ were edited or mixed from two runs: rerun 01 and 02")


# ------------------------------------------------------------------------------------------------
# 3. Age groups
# ------------------------------------------------------------------------------------------------

def parse_age_edges(text: str | Sequence[float]) -> tuple[float, ...]:
    """'5,10,15' -> (5.0, 10.0, 15.0); strictly increasing and positive."""
    values = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    if not values or any(b <= a for a, b in zip(values, values[1:])) or values[0] <= 0:
        raise InputError(f"--age-edges {text!r}: give strictly increasing positive years, e.g. 5,10,15")
    return tuple(values)


def age_group_of(age, edges: Sequence[float]) -> np.ndarray:
    """Half-open bins [e_i, e_{i+1}): a child who turned 5.0 today is in group 1, never in two.

    Edges (5, 10, 15) give groups 0..3 = [0,5), [5,10), [10,15), [15, inf), the original wrist
    pipeline's; (8, 15) gives the original Swin pipeline's three groups.
    """
    return np.searchsorted(np.asarray(edges, dtype=float), np.asarray(age, dtype=float), side="right")


def age_group_names(edges: Sequence[float]) -> list[str]:
    bounds = [0.0, *edges, math.inf]
    return [f"[{_fmt_years(a)},{_fmt_years(b)})" for a, b in zip(bounds, bounds[1:])]


def _fmt_years(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:g}"


def add_age_columns(wrist: pd.DataFrame, edges: Sequence[float]) -> pd.DataFrame:
    """age_group: the models' age group; age_bin: the whole year of age (the test-set cells)."""
    wrist = wrist.copy()
    wrist["age_group"] = age_group_of(wrist["age"], edges)
    wrist["age_bin"] = np.floor(wrist["age"]).astype(int)
    return wrist


def add_boneage_bin(boneage: pd.DataFrame) -> pd.DataFrame:
    """age_bin: whole years of bone age, the strata of the bone-age test draw and train/val split."""
    boneage = boneage.copy()
    boneage["age_bin"] = np.floor(boneage["boneage"] / 12).astype(int)
    return boneage


def sort_wrist(frame: pd.DataFrame) -> pd.DataFrame:
    """One fixed row order for the wrist split CSVs: the same split is the same file, byte for byte."""
    return frame.sort_values(["projection", "age_bin", "label", "filestem"])


def sort_boneage(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["age_bin", "sex", "id"])


def age_groups_path(out: Path) -> Path:
    return Path(out) / "splits" / "age_groups.json"


def read_age_edges(out: Path) -> tuple[float, ...]:
    """The edges 01_split_test.py chose; every later stage uses these, never its own."""
    path = age_groups_path(out)
    if not path.is_file():
        raise InputError(f"{path}: not found; run 01_split_test.py with the same --out first")
    return tuple(read_json(path)["edges"])


# ------------------------------------------------------------------------------------------------
# 4. Images: loading, letterbox, preprocess-once cache
# ------------------------------------------------------------------------------------------------

class ImageReadError(Exception):
    """An image that cannot be decoded; callers count and report it as a skipped row."""


def is_dicom(path: Path) -> bool:
    path = Path(path)
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def read_raw_image(path: Path) -> np.ndarray:
    """Decode one image to a 2-D float32 array in display orientation (bone bright).

    PNG/JPEG keep their bit depth (8 or 16 bit; never Pillow's convert('L'), which clips 16-bit
    radiographs to near-white). DICOM gets its modality LUT (rescale slope/intercept), its VOI LUT
    or window when present, and MONOCHROME1 is inverted so bone is bright as in MONOCHROME2.
    """
    path = Path(path)
    if is_dicom(path):
        return _read_dicom_pixels(path)
    import cv2
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageReadError(f"{path}: cannot decode the image (corrupt or not PNG/JPEG/DICOM)")
    if image.ndim == 3:
        channels = image.shape[2]
        image = image[..., 0] if channels == 1 else cv2.cvtColor(
            image, cv2.COLOR_BGRA2GRAY if channels == 4 else cv2.COLOR_BGR2GRAY)
    return image.astype(np.float32)


def _read_dicom_pixels(path: Path) -> np.ndarray:
    """DICOM pixels in display orientation; padding pixels (PixelPaddingValue) become NaN.

    NaN marks "no image here": scale_to_unit leaves them out of the percentiles and paints them
    black, the letterbox's own background, so a padded border never sets the contrast of the bone.
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
    try:
        dataset = pydicom.dcmread(path)
    except Exception as error:  # noqa: BLE001 -- pydicom raises many types for a corrupt header
        raise ImageReadError(f"{path}: not a readable DICOM file ({type(error).__name__}: {error})") from None
    if "PixelData" not in dataset:
        raise ImageReadError(f"{path}: DICOM without pixel data (a report or plan, not an image); "
                             "leave it out of the input")
    frames = _dicom_int(dataset, "NumberOfFrames", 1)
    if frames > 1:
        # A radiograph is one frame; guessing which frame of a cine or stack is "the" view would
        # feed the model an image nobody chose.
        raise ImageReadError(f"{path}: multi-frame DICOM ({frames} frames); a radiograph has one "
                             "frame: export each view as its own single-frame file")
    try:
        stored = dataset.pixel_array
    except Exception as error:  # noqa: BLE001 -- decoders raise many types
        raise ImageReadError(f"{path}: cannot decode the DICOM pixels ({type(error).__name__}: "
                             f"{' '.join(str(error).split())[:300]}); {_decoder_hint(dataset)}") from None
    padding = _padding_mask(stored, dataset)
    pixels = stored.mean(axis=-1) if stored.ndim == 3 else stored  # RGB secondary capture
    pixels = apply_modality_lut(pixels, dataset).astype(np.float32)
    if "VOILUTSequence" in dataset or "WindowCenter" in dataset:
        pixels = apply_voi_lut(pixels, dataset, index=0).astype(np.float32)
    # MONOCHROME1 shows low values bright. PresentationLUTShape INVERSE asks for the same flip;
    # DX objects set INVERSE together with MONOCHROME1 for one and the same inversion, so the two
    # are one condition (OR), never two flips.
    photometric = str(dataset.get("PhotometricInterpretation", "")).upper()
    if photometric == "MONOCHROME1" or str(dataset.get("PresentationLUTShape", "")).upper() == "INVERSE":
        pixels = pixels.max() + pixels.min() - pixels
    if padding is not None:
        if padding.all():
            raise ImageReadError(f"{path}: every pixel equals PixelPaddingValue; no image to read")
        pixels[padding] = np.nan
    return pixels


def _dicom_int(dataset, keyword: str, default: int) -> int:
    try:
        return int(dataset.get(keyword, default) or default)
    except (TypeError, ValueError):
        return default


def _padding_mask(stored: np.ndarray, dataset) -> np.ndarray | None:
    """True where the stored value is PixelPaddingValue (or within PixelPaddingRangeLimit)."""
    if "PixelPaddingValue" not in dataset or stored.ndim != 2:
        return None
    first = int(dataset.PixelPaddingValue)
    last = int(dataset.get("PixelPaddingRangeLimit", first))
    low, high = min(first, last), max(first, last)
    return (stored >= low) & (stored <= high)


def _decoder_hint(dataset) -> str:
    """What to do about an undecodable file: install a decoder, or re-export a corrupt one."""
    from pydicom.pixels import get_decoder
    syntax = getattr(dataset, "file_meta", {}).get("TransferSyntaxUID")
    if syntax is None:
        return "the file has no transfer syntax; re-export it from the PACS"
    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:
        return f"no decoder exists for {syntax.name}; re-export it uncompressed or as JPEG Lossless"
    if not available:
        return (f"no decoder installed for {syntax.name}: pip install -r requirements.txt "
                "(the pylibjpeg plugins)")
    return f"the {syntax.name} data looks corrupt or truncated; re-export the image from the PACS"


# DICOM's DX view codes (CID 4010) for the two modelled projections. pydicom's Code compares
# SNOMED CT codes with their legacy SRT forms (R-10206 == 399348003), so both spellings match.
def _view_codes() -> dict[str, list]:
    from pydicom.sr.codedict import codes
    return {"AP": [codes.SCT.AnteroPosterior, codes.SCT.PosteroAnterior, codes.SCT.Frontal],
            "Lat": [codes.SCT.LateralProjection, codes.SCT.RightLateral, codes.SCT.LeftLateral,
                    codes.SCT.LateralMedial, codes.SCT.MedioLateralProjection]}


DICOM_VIEW_POSITIONS = {"AP": "AP", "PA": "AP", "LAT": "Lat", "LL": "Lat", "RL": "Lat", "LATERAL": "Lat"}


def read_dicom_tags(path: Path, study_salt: bytes = b"") -> dict:
    """The few non-identifying values a hospital run may use: view, age, sex, laterality, study.

    projection   'AP'/'Lat' from ViewPosition, else the ViewCodeSequence; 'other' for a view given
                 but not modelled (oblique, ...); None when the file gives none
    view_source  'ViewPosition' or 'ViewCodeSequence'
    age (years), sex ('M'/'F'), laterality ('L'/'R' from ImageLaterality, else Laterality)
    study_key    a keyed one-way hash of StudyInstanceUID (see study_key); never the UID itself
    Names, IDs and birth dates are never read into anything the pipeline writes.
    """
    import pydicom
    from pydicom.sr.coding import Code
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    view = str(dataset.get("ViewPosition", "") or "").strip().upper()
    projection, source = DICOM_VIEW_POSITIONS.get(view, "other" if view else None), "ViewPosition"
    if projection is None and dataset.get("ViewCodeSequence"):
        item = dataset.ViewCodeSequence[0]
        code = Code(str(item.get("CodeValue", "")), str(item.get("CodingSchemeDesignator", "")),
                    str(item.get("CodeMeaning", "")))
        source = "ViewCodeSequence"
        projection = next((name for name, known in _view_codes().items() if code in known), "other")
    laterality = str(dataset.get("ImageLaterality", "") or dataset.get("Laterality", "") or "").upper()
    sex = str(dataset.get("PatientSex", "") or "").upper()
    uid = str(dataset.get("StudyInstanceUID", "") or "")
    return {"projection": projection, "view_source": source if projection else None,
            "age": _dicom_age_years(str(dataset.get("PatientAge", "") or "")),
            "sex": sex if sex in ("M", "F") else None,
            "laterality": laterality if laterality in ("L", "R") else None,
            "study_key": study_key(uid, study_salt) if uid else None}


def study_key(uid: str, salt: bytes) -> str:
    """'S' + 16 hex digits of HMAC-SHA256(salt, StudyInstanceUID).

    A plain hash is not enough: UIDs are an organisation root plus a timestamp and a counter, few
    enough guesses to brute-force. Keyed with a random salt that is made per run and never
    written, the key groups the images of one run and cannot be traced back to the study.
    """
    import hashlib
    import hmac
    return "S" + hmac.new(salt, uid.encode(), hashlib.sha256).hexdigest()[:16]


def _dicom_age_years(text: str) -> float | None:
    match = re.fullmatch(r"(\d{1,3})([DWMY])", text.strip().upper())
    if not match:
        return None
    value, unit = int(match.group(1)), match.group(2)
    return value / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[unit]


def scale_to_unit(raw: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> np.ndarray:
    """Map raw values to [0, 1] between robust percentiles, whatever the bit depth.

    Percentiles rather than min/max: one hot pixel or a burned-in label must not flatten the
    contrast of the bone. A constant image maps to zeros instead of dividing by zero.
    """
    padded = np.isnan(raw)  # DICOM pixel padding (_read_dicom_pixels): no part of the image
    if padded.any():
        low, high = np.percentile(raw[~padded], [low_pct, high_pct])
    else:
        low, high = np.percentile(raw, [low_pct, high_pct])
    if high <= low:
        return np.zeros_like(raw, dtype=np.float32)
    return np.nan_to_num(np.clip((raw - low) / (high - low), 0.0, 1.0), nan=0.0).astype(np.float32)


@dataclass
class Letterbox:
    """Where the original image sits inside the padded square (to undo it for Grad-CAM)."""
    height: int
    width: int
    scale: float
    top: int
    left: int
    resized_height: int
    resized_width: int

    @property
    def region(self) -> tuple[slice, slice]:
        """The rows and columns of the padded square that hold the image."""
        return (slice(self.top, self.top + self.resized_height),
                slice(self.left, self.left + self.resized_width))


def letterbox(image01: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """Resize keeping the aspect ratio, then pad to size x size with black.

    Wrist radiographs are about 2:1; squashing them into a square (as the original pipelines did)
    distorts the bone shapes a fracture is read from.
    """
    import cv2
    height, width = image01.shape
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image01, (new_w, new_h), interpolation=interpolation)
    box = Letterbox(height, width, scale, (size - new_h) // 2, (size - new_w) // 2, new_h, new_w)
    square = np.zeros((size, size), dtype=np.uint8)
    square[box.region] = np.clip(resized * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return square, box


def preprocess_image(path: Path, size: int) -> tuple[np.ndarray, Letterbox]:
    """THE preprocessing: decode, robust-scale, letterbox to uint8 size x size.

    Training (through the cache), evaluation and 07_predict all call this one function, so a model
    never sees different pixels at inference than in training.
    """
    return letterbox(scale_to_unit(read_raw_image(path)), size)


CACHE_VERSION = 1


@dataclass
class ImageCache:
    """A uint8 [N, size, size] array on disk holding each source image decoded once.

    `rows[path]` is the row of a source image; `errors[path]` says why one could not be decoded.
    """
    array_path: Path
    size: int
    rows: dict[str, int]
    errors: dict[str, str]

    def open(self) -> np.ndarray:
        return np.load(self.array_path, mmap_mode="r")

    def rows_for(self, paths: Sequence[str]) -> np.ndarray:
        return np.array([self.rows[str(p)] for p in paths], dtype=np.int64)


def _file_stamp(path: str) -> list[int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_mtime_ns, stat.st_size]


def build_image_cache(paths: Sequence[str], size: int, cache_dir: Path, name: str,
                      workers: int | None = None) -> ImageCache:
    """Decode every image not yet cached (or changed since) into `cache_dir/name_size.npy`.

    The cache is keyed by (dataset name, size); an entry is reused while its source file's
    modification time and size are unchanged, so every epoch and every stage reads the same
    pre-resized pixels (about 12 us per image instead of ~14 ms+ to decode a 16-bit PNG). Changed
    or new files are decoded in parallel; the new array and index replace the old ones atomically.
    """
    cache_dir = Path(cache_dir)
    array_path = cache_dir / f"{name}_{size}.npy"
    index_path = cache_dir / f"{name}_{size}.json"
    wanted = sorted({str(p) for p in paths})
    stamps = {p: _file_stamp(p) for p in wanted}
    old_entries = _read_cache_index(index_path, array_path, size)
    reusable = {p: e for p, e in old_entries.items() if e["stamp"] == stamps.get(p) and p in stamps}
    if len(reusable) == len(wanted):
        log(f"image cache {array_path.name}: all {len(wanted)} images cached")
        return _cache_from_entries(array_path, size, reusable)

    to_decode = [p for p in wanted if p not in reusable]
    # Keep other still-valid entries too, so the router's and the fracture stage's subsets of one
    # dataset share a single file.
    keep = {p: e for p, e in old_entries.items() if p not in stamps and _file_stamp(p) == e["stamp"]}
    keep.update(reusable)
    order = sorted(keep) + to_decode
    entries: dict[str, dict] = {}
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(array_path) as tmp_array:
        array = np.lib.format.open_memmap(tmp_array, mode="w+", dtype=np.uint8,
                                          shape=(len(order), size, size))
        if keep:
            old = np.load(array_path, mmap_mode="r")
            for row, path in enumerate(sorted(keep)):
                array[row] = old[keep[path]["row"]]
                entries[path] = {"row": row, "stamp": keep[path]["stamp"], "error": keep[path]["error"]}
            del old
        array.flush()
        del array
        start = time.perf_counter()
        errors = _decode_into(tmp_array, order, len(keep), size, workers)
        seconds = time.perf_counter() - start
        for offset, path in enumerate(to_decode):
            entries[path] = {"row": len(keep) + offset, "stamp": stamps[path], "error": errors.get(path)}
        with atomic_path(index_path) as tmp_index:
            # The index is replaced first, then the array; a reader that finds the two out of step
            # (shape mismatch) rebuilds instead of trusting either.
            tmp_index.write_text(json.dumps({"version": CACHE_VERSION, "size": size,
                                             "count": len(order), "entries": entries}))
    log(f"image cache {array_path.name}: decoded {len(to_decode)} images in {seconds:.1f} s "
        f"({len(to_decode) / max(seconds, 1e-9):.0f} images/s), reused {len(keep)}, "
        f"{len(errors)} unreadable")
    return _cache_from_entries(array_path, size, entries)


def _read_cache_index(index_path: Path, array_path: Path, size: int) -> dict[str, dict]:
    if not (index_path.is_file() and array_path.is_file()):
        return {}
    try:
        index = json.loads(index_path.read_text())
        shape = np.load(array_path, mmap_mode="r").shape
    except (ValueError, OSError):
        return {}
    if index.get("version") != CACHE_VERSION or index.get("size") != size or shape != (
            index.get("count"), size, size):
        return {}
    return index["entries"]


def _cache_from_entries(array_path: Path, size: int, entries: dict[str, dict]) -> ImageCache:
    rows = {p: e["row"] for p, e in entries.items()}
    errors = {p: e["error"] for p, e in entries.items() if e["error"]}
    return ImageCache(array_path, size, rows, errors)


def _decode_into(array_path: Path, order: list[str], first_row: int, size: int,
                 workers: int | None) -> dict[str, str]:
    """Decode order[first_row:] into rows first_row.. of the .npy, in worker processes.

    Each worker writes straight into the memory-mapped file, so no pixels travel through pipes.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    jobs = [(str(array_path), row, order[row], size) for row in range(first_row, len(order))]
    if not jobs:
        return {}
    workers = workers or min(8, os.cpu_count() or 1)
    errors: dict[str, str] = {}
    if workers <= 1 or len(jobs) < 64:
        results = map(_decode_job, jobs)
        for path, error in progress(results, total=len(jobs), desc="decode images", unit="img"):
            if error:
                errors[path] = error
        return errors
    context = multiprocessing.get_context("fork" if sys.platform != "win32" else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        results = pool.map(_decode_job, jobs, chunksize=max(1, min(64, len(jobs) // (workers * 8))))
        for path, error in progress(results, total=len(jobs), desc="decode images", unit="img"):
            if error:
                errors[path] = error
    return errors


_WORKER_ARRAYS: dict[str, np.ndarray] = {}


def _decode_job(job: tuple[str, int, str, int]) -> tuple[str, str | None]:
    array_path, row, path, size = job
    array = _WORKER_ARRAYS.get(array_path)
    if array is None:
        import cv2
        cv2.setNumThreads(1)  # one process per core already; nested threads only thrash
        array = _WORKER_ARRAYS[array_path] = np.load(array_path, mmap_mode="r+")
    try:
        array[row], _ = preprocess_image(Path(path), size)
    except (ImageReadError, OSError, ValueError) as error:
        return path, str(error)
    return path, None


def open_image_cache(paths: Sequence[str], size: int, cache_dir: Path, name: str,
                     workers: int | None = None) -> ImageCache:
    """Build the cache on one process per node, then let every rank open it read-only."""
    import torch.distributed as dist
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or int(os.environ.get("LOCAL_RANK", "0")) == 0:
        cache = build_image_cache(paths, size, cache_dir, name, workers)
    if distributed:
        dist.barrier()
        if int(os.environ.get("LOCAL_RANK", "0")) != 0:
            index = read_json(Path(cache_dir) / f"{name}_{size}.json")
            cache = _cache_from_entries(Path(cache_dir) / f"{name}_{size}.npy", size, index["entries"])
    return cache


def cache_split_images(frames: dict[str, pd.DataFrame], size: int, out: Path, name: str,
                       workers: int | None = None) -> tuple[dict[str, pd.DataFrame], ImageCache]:
    """Open (building if needed) the cache for every image of the given splits; drop unreadable rows."""
    paths = sorted({p for frame in frames.values() for p in frame["image_path"].astype(str)})
    cache = open_image_cache(paths, size, Path(out) / "cache", name, workers)
    return {split: drop_unreadable(frame, cache, f"{name} {split}") for split, frame in frames.items()}, cache


def drop_unreadable(frame: pd.DataFrame, cache: ImageCache, what: str) -> pd.DataFrame:
    """Remove rows whose image could not be decoded: a counted, reported skip, not a crash."""
    bad = frame["image_path"].map(lambda p: str(p) in cache.errors)
    if bad.any():
        first = frame.loc[bad, "image_path"].iloc[0]
        log(f"skipped {int(bad.sum())} unreadable image(s) in {what}, e.g. {cache.errors[str(first)]}")
    return frame[~bad].reset_index(drop=True)


# ------------------------------------------------------------------------------------------------
# 4b. Fracture models of a run and Grad-CAM++ overlays (06_gradcam and 07_predict)
# ------------------------------------------------------------------------------------------------

MAX_OVERLAY_SIDE = 1024  # full-size radiographs would make 10 MB PNGs


def fracture_models(fracture_dir: Path) -> dict[tuple[str, int], Path]:
    """{(projection, age group): best.pt} of every model 04 trained, AP before Lat, groups in
    order; a group 04 skipped has no best.pt. (06 and 07 use this.)"""
    found = {}
    for projection in PROJECTIONS:
        groups = sorted(int(folder.name.removeprefix("group"))
                        for folder in (Path(fracture_dir) / projection).glob("group*")
                        if folder.name.removeprefix("group").isdigit())
        for group in groups:
            path = Path(fracture_dir) / projection / f"group{group}" / "best.pt"
            if path.is_file():
                found[(projection, group)] = path
    return found


def grad_cam_plus_plus(model, squares: np.ndarray, device) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM++ maps of the fracture logit, [B, S, S] in [0, 1], and the fracture probabilities.

    `squares` are uint8 [B, S, S] from preprocess_image. The model has ONE logit; the
    target is BinaryClassifierOutputTarget(1), i.e. the logit itself (evidence FOR a fracture),
    for every image whatever its prediction: a false negative then shows what little fracture
    evidence the model found, a false positive what misled it. (ClassifierOutputTarget(0) picks the
    same logit; ClassifierOutputTarget(1) would index past the single output, and the default
    argmax target is meaningless for one logit.) fp32 without autocast: Grad-CAM++ weights use
    gradients cubed, which underflow in bf16.
    """
    import torch
    from pytorch_grad_cam import GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget
    model = model.float().eval()
    images = prepare_images(torch.from_numpy(np.ascontiguousarray(squares)).unsqueeze(1),
                                   device, train=False, channels_last=False)
    cam = GradCAMPlusPlus(model, target_layers_for(model), reshape_transform=reshape_transform_for(model))
    try:
        # Not `with cam:` -- its __exit__ swallows IndexError and would hide a wrong target layer.
        with torch.enable_grad(), torch.autocast(device.type, enabled=False), \
                layer_norm_statistics_as_constants(model):
            maps = cam(images, targets=[BinaryClassifierOutputTarget(1)] * len(images))
        logits = cam.outputs.detach().float().reshape(len(images), -1)[:, 0]
    finally:
        cam.activations_and_grads.release()
        model.zero_grad(set_to_none=True)
    return maps.astype(np.float32), torch.sigmoid(logits).cpu().numpy()


@contextlib.contextmanager
def layer_norm_statistics_as_constants(model):
    """Within the block, every LayerNorm passes gradients as if its mean and variance were constants.

    The forward values are unchanged. Why: the LayerNorm between the last stage and the logit
    (ConvNeXt's head norm after pooling, Swin's final norm) makes the logit invariant to the scale
    of its input, so the true gradient is orthogonal to the features themselves: for ConvNeXt,
    gradient x activation then sums to exactly zero over the image, and which part of the map
    comes out positive is arbitrary (in our tests, the opposite corner to the evidence about half
    the time). With the statistics held constant the head is linear in the features, each
    position's share of the logit is exact, and the map follows the evidence; this is the "LN
    rule" of Ali et al., ICML 2022. LayerNorms before the target layer do not affect its gradient.
    """
    import torch
    from timm.layers import LayerNorm2d

    def hook(module, inputs, output):
        features = inputs[0]
        # timm's LayerNorm2d normalises channels (dim 1) of NCHW maps; nn.LayerNorm the last dims.
        dims = (1,) if isinstance(module, LayerNorm2d) else tuple(range(-len(module.normalized_shape), 0))
        scale = torch.rsqrt(features.var(dim=dims, keepdim=True, unbiased=False) + module.eps).detach()
        if module.weight is not None:
            weight = module.weight.detach()
            scale = scale * (weight.view(-1, 1, 1) if isinstance(module, LayerNorm2d) else weight)
        # Value: the LayerNorm's own output. Gradient: weight / std, the statistics held fixed.
        return output.detach() + (features - features.detach()) * scale

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def target_layers_for(model) -> list:
    """The last feature stage before pooling, per architecture family (timm models).

    ConvNeXt and ConvNeXtV2 (one timm class): `stages[-1]`, channels-first (B, C, H, W).
    Swin (v1 and v2): `layers[-1]`, whose output is channels-LAST (B, H, W, C): it needs
    `reshape_transform_for(model)`, or the CAM would weigh rows of the map as if they were channels.
    ResNet family (the demo's resnet10t): `layer4[-1]`, the last residual block.
    """
    family = _family(model)
    if family == "convnext":
        return [model.stages[-1]]
    if family == "swin":
        return [model.layers[-1]]
    return [model.layer4[-1]]


def reshape_transform_for(model):
    """None for channels-first families; `to_channels_first` for Swin's channels-last stages."""
    return to_channels_first if _family(model) == "swin" else None


def _family(model) -> str:
    from timm.models.convnext import ConvNeXt
    from timm.models.resnet import ResNet
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.swin_transformer_v2 import SwinTransformerV2
    if isinstance(model, ConvNeXt):
        return "convnext"
    if isinstance(model, (SwinTransformer, SwinTransformerV2)):
        return "swin"
    if isinstance(model, ResNet):
        return "resnet"
    raise InputError(f"Grad-CAM++: no target layer known for {type(model).__name__} "
                            f"({getattr(model, 'arch', '?')}); supported: ConvNeXt/ConvNeXtV2, Swin, "
                            "ResNet; add the family to common.target_layers_for")


def to_channels_first(tensor):
    """(B, H, W, C) maps or (B, N, C) tokens of a square grid -> (B, C, H, W), as grad-cam expects.

    Token sequences may start with class/register tokens: the N - side**2 leading ones are dropped.
    """
    if tensor.ndim == 3:
        batch, tokens, channels = tensor.shape
        side = math.isqrt(tokens)
        tensor = tensor[:, tokens - side * side:].reshape(batch, side, side, channels)
    if tensor.ndim != 4:
        raise ValueError(f"expected (B, H, W, C) or (B, N, C) features, got shape {tuple(tensor.shape)}")
    return tensor.permute(0, 3, 1, 2)


def caption(prob: float, threshold: float, label: int | None = None, outcome: str | None = None) -> str:
    """'fracture p=0.834 (threshold 0.412) | label 1 | TP'; without a label (07) the prediction.

    Three decimals: near the threshold two would print p=0.55 (threshold 0.55) for a miss.
    """
    text = f"fracture p={prob:.3f} (threshold {threshold:.3f})"
    if label is None:
        return f"{text} | predicted {'fracture' if prob >= threshold else 'no fracture'}"
    return f"{text} | label {int(label)}" + (f" | {outcome}" if outcome else "")


def render_overlay(image_path, cam_square: np.ndarray, box: Letterbox, text: str,
                   max_side: int = MAX_OVERLAY_SIDE) -> np.ndarray:
    """RGB uint8: the map on the original image (letterbox undone), with `text` in a banner on top."""
    unit = scale_to_unit(read_raw_image(Path(image_path)))
    return add_caption(overlay_on_original(unit, cam_square, box, max_side), text)


def overlay_on_original(unit_image: np.ndarray, cam_square: np.ndarray, box: Letterbox,
                        max_side: int = MAX_OVERLAY_SIDE) -> np.ndarray:
    """Cut the image region out of the padded-square CAM, resize it to the original height x width
    (shrunk so the longest side is <= max_side), and blend a colour map over the grey image.

    `unit_image` is the original in [0, 1] (scale_to_unit), the same pixels the letterbox
    was made from; returns RGB uint8 of the original's shape (or its shrunk copy).
    """
    import cv2
    from pytorch_grad_cam.utils.image import show_cam_on_image
    if unit_image.shape != (box.height, box.width):
        raise ValueError(f"image {unit_image.shape} does not match its letterbox ({box.height}, {box.width})")
    region = cam_square[box.region]
    shrink = min(1.0, max_side / max(box.height, box.width))
    size = (max(1, round(box.width * shrink)), max(1, round(box.height * shrink)))  # cv2: (w, h)
    cam = np.clip(cv2.resize(region.astype(np.float32), size, interpolation=cv2.INTER_LINEAR), 0, 1)
    grey = unit_image if shrink == 1.0 else cv2.resize(unit_image, size, interpolation=cv2.INTER_AREA)
    rgb = np.repeat(np.clip(grey, 0, 1)[..., None], 3, axis=2).astype(np.float32)
    return show_cam_on_image(rgb, cam, use_rgb=True, image_weight=0.6)


def add_caption(rgb: np.ndarray, text: str) -> np.ndarray:
    """A black banner above the image with the caption in white; its ' | ' parts wrap onto more
    lines when one line would be too small to read on a narrow image."""
    import cv2
    font, width = cv2.FONT_HERSHEY_SIMPLEX, rgb.shape[1]
    usable = 0.96 * width
    lines = [text]
    if cv2.getTextSize(text, font, 1.0, 1)[0][0] * 0.5 > usable:
        lines = text.split(" | ")
    widest = max(cv2.getTextSize(line, font, 1.0, 1)[0][0] for line in lines)
    line_h = cv2.getTextSize("Ag", font, 1.0, 1)[0][1]
    scale = min(1.0, usable / widest)
    thickness = 2 if scale > 0.7 else 1
    step = int(line_h * scale * 1.8) + 2
    banner = np.zeros((step * len(lines) + 4, width, 3), dtype=np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(banner, line, (max(2, int(0.02 * width)), step * i + int(step * 0.75) + 2), font,
                    scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return np.concatenate([banner, rgb], axis=0)


def write_png(rgb: np.ndarray, path: Path) -> Path:
    import cv2
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    with atomic_path(path) as tmp:
        tmp.write_bytes(encoded.tobytes())
    return Path(path)


# ------------------------------------------------------------------------------------------------
# 5. Models and losses
# ------------------------------------------------------------------------------------------------

def check_architecture(arch: str) -> None:
    import timm
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=4)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise InputError(f"--arch {arch}: not a timm architecture{hint}")


def check_training_args(args: argparse.Namespace) -> None:
    """Fail before any work (and before the process group starts) on a bad arch, device or weights path."""
    check_architecture(args.arch)
    resolve_device(args.device)
    _check_weights_file(args.pretrained, args.arch)
    if getattr(args, "init_from", None):
        trained_as = load_checkpoint(Path(args.init_from)).get("arch")  # readable, weights_only
        if trained_as and trained_as != args.arch:
            raise InputError(f"--init-from {args.init_from}: trained as {trained_as}, this run builds "
                             f"{args.arch}; pass --arch {trained_as}")


def _check_weights_file(pretrained: str | None, arch: str) -> None:
    if pretrained not in (None, "download") and not Path(pretrained).is_file():
        raise InputError(f"--pretrained {pretrained}: weights file not found; download the {arch} "
                         "weights (.safetensors or .pth) on an online machine and give the local path")


def create_model(arch: str, num_classes: int, in_chans: int = 1, pretrained: str | None = None,
                 image_size: int | None = None, **kwargs):
    """A timm model with `num_classes` outputs on `in_chans`-channel (grey) input.

    pretrained: None = random init (the demo); a path = weights from that local file (timm adapts
    the first convolution to one channel and drops a classifier of the wrong size); 'download' =
    let timm fetch them, for an online machine only.
    """
    import timm
    check_architecture(arch)
    if image_size and any(family in arch for family in ("swin", "vit", "deit")):
        kwargs["img_size"] = image_size  # transformers fix their input size (and position tables)
    if pretrained is None:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if pretrained == "download":
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or not _can_reach("huggingface.co")
        try:
            if offline:
                raise ConnectionError("no connection to huggingface.co")
            return timm.create_model(arch, pretrained=True, num_classes=num_classes, in_chans=in_chans, **kwargs)
        except Exception as error:  # offline: huggingface_hub/urllib raise many error types
            raise InputError(f"--pretrained download: could not fetch weights for {arch} "
                             f"({type(error).__name__}); on a machine with internet run "
                             f"`python -c \"import timm; timm.create_model('{arch}', pretrained=True)\"`, "
                             "copy the .safetensors file from the Hugging Face cache, and pass "
                             "--pretrained PATH") from None
    _check_weights_file(pretrained, arch)
    return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": str(pretrained)},
                             num_classes=num_classes, in_chans=in_chans, **kwargs)


def _can_reach(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    import socket
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _torch_modules():
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    return torch, nn, F


def binary_focal_loss(logits, targets, alpha: float = 0.5, gamma: float = 2.0):
    """Focal loss (Lin et al. 2017) for one logit per image.

    alpha weights the positive class and 1 - alpha the negative one (a real per-class weight, not
    a constant); gamma down-weights easy examples. With gamma = 0 this is alpha-weighted BCE.
    """
    torch, _, F = _torch_modules()
    targets = targets.float()
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
    p_true = torch.exp(-bce)  # probability the model gives the true class
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * (1 - p_true) ** gamma * bce).mean()


def build_gem(p: float = 3.0, eps: float = 1e-6):
    """Generalised-mean pooling with a learnable exponent p (p=1: average, p->inf: max).

    Small, bright structures (a growth plate, a cortical break) survive GeM better than averaging.
    """
    torch, nn, F = _torch_modules()

    class GeM(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.tensor(float(p)))
            self.eps = eps

        def forward(self, x):
            pooled = F.adaptive_avg_pool2d(x.float().clamp(min=self.eps).pow(self.p), 1)
            return pooled.pow(1.0 / self.p).flatten(1)

    return GeM()


def build_boneage_model(arch: str, pretrained: str | None = None, max_months: float = BONEAGE_MAX_MONTHS,
                        init_months: float | None = None, sex_dim: int = 16):
    """Backbone features -> GeM -> concat sex embedding -> MLP head -> sigmoid x max_months.

    The sigmoid keeps every prediction within [0, max_months]. Sex enters as an embedding because
    bone maturation differs by sex: the same hand means a different bone age in a girl and a boy.
    init_months sets the head's bias so training starts from the training mean, not 120 months.
    """
    torch, nn, _ = _torch_modules()
    backbone = create_model(arch, num_classes=0, global_pool="", pretrained=pretrained)
    channels_last_output = getattr(backbone, "output_fmt", "NCHW") == "NHWC"

    class BoneAgeModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = backbone
            self.pool = build_gem()
            self.sex_embedding = nn.Embedding(2, sex_dim)
            self.head = nn.Sequential(nn.Linear(backbone.num_features + sex_dim, 256), nn.GELU(),
                                      nn.Dropout(0.1), nn.Linear(256, 1))
            self.max_months = max_months
            if init_months is not None:
                fraction = min(max(init_months / max_months, 0.01), 0.99)
                nn.init.constant_(self.head[-1].bias, math.log(fraction / (1 - fraction)))

        def forward(self, images, male):
            features = self.backbone.forward_features(images)
            if channels_last_output:
                features = features.permute(0, 3, 1, 2)
            pooled = self.pool(features)
            joined = torch.cat([pooled, self.sex_embedding(male.long())], dim=1)
            return torch.sigmoid(self.head(joined).squeeze(1).float()) * self.max_months

    model = BoneAgeModel()
    model.arch = arch
    return model


# ------------------------------------------------------------------------------------------------
# 6. Distributed
# ------------------------------------------------------------------------------------------------

@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: "object"  # torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(choice: str, local_rank: int = 0):
    import torch
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu "
                             "(or auto), or check CUDA_VISIBLE_DEVICES and the driver")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def setup_distributed(device_choice: str = "auto") -> DistInfo:
    """Join the process group that torchrun describes in RANK/WORLD_SIZE/LOCAL_RANK.

    Plain `python stage.py` sets none of them and gets a one-process DistInfo, no process group.
    NCCL on GPUs, gloo on CPU. Validate inputs BEFORE calling this so a bad file fails every rank
    the same way instead of leaving the others waiting in a collective.
    """
    import torch
    import torch.distributed as dist
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_choice, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
    if device.type == "cpu":
        # torchrun's default of 1 thread per worker is right for N workers on N cores; a single
        # process may use them all.
        threads = os.environ.get("OMP_NUM_THREADS")
        torch.set_num_threads(int(threads) if threads else max(1, (os.cpu_count() or 1) // world_size))
    return DistInfo(rank, world_size, local_rank, device)


def cleanup_distributed() -> None:
    """barrier + destroy_process_group, then flush: without it gloo aborts at exit now and then."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()


def barrier() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Send a picklable object from rank `src` to every rank (identity without a process group)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_reduce_sum(values: Sequence[float], device) -> list[float]:
    import torch
    import torch.distributed as dist
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def gather_rows(local, device):
    """Concatenate equally-shaped per-rank tensors on every rank (rank order)."""
    import torch
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return local
    local = local.to(device)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts).cpu()


class EpochSampler:
    """Draws one epoch of dataset indices, the same on every rank, and hands each rank a disjoint share.

    balanced=True: half the epoch from each class (the minority class is cycled through random
    permutations, so an image repeats only once every other image of its class has been seen);
    balanced=False: a random permutation of the whole set (cycled when epoch_size exceeds it,
    so a small set still gets enough steps). The draw is seeded by (seed, epoch),
    identical on every rank; rank r takes positions r, r+W, r+2W, ..., so no two ranks train on
    the same draw and every rank has the same number of samples (hence the same batch count; the
    last few draws that do not divide by W are left out of that epoch).
    """

    def __init__(self, labels: Sequence[int], *, balanced: bool, rank: int = 0, world_size: int = 1,
                 seed: int = 0, epoch_size: int | None = None):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.balanced = balanced
        self.rank, self.world_size, self.seed = rank, world_size, seed
        total = epoch_size or len(self.labels)
        self.per_rank = total // world_size
        self.epoch = 0
        if balanced and len(np.unique(self.labels)) < 2:
            raise ValueError("a balanced sampler needs both classes in the training set")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_indices(self) -> np.ndarray:
        """The whole epoch's draw (all ranks), identical on every rank."""
        rng = np.random.default_rng([self.seed, self.epoch])
        total = self.per_rank * self.world_size
        if not self.balanced:
            return _cycled_permutation(np.arange(len(self.labels)), total, rng)
        classes = np.unique(self.labels)
        shares = [total // len(classes) + (1 if i < total % len(classes) else 0) for i in range(len(classes))]
        draws = [_cycled_permutation(np.flatnonzero(self.labels == c), n, rng) for c, n in zip(classes, shares)]
        return rng.permutation(np.concatenate(draws))

    def __iter__(self):
        return iter(self.epoch_indices()[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return self.per_rank


def _cycled_permutation(pool: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    rounds = [rng.permutation(pool) for _ in range(-(-count // len(pool)))]
    return np.concatenate(rounds)[:count]


def shard_for_eval(n_items: int, rank: int, world_size: int) -> np.ndarray:
    """Positions rank, rank+W, ... padded (by repeating the last) to the same length on every rank.

    Padding keeps all_gather shapes equal; `gather_predictions` drops the padded copies by index.
    """
    per_rank = -(-n_items // world_size)
    positions = np.arange(rank, per_rank * world_size, world_size)
    return np.minimum(positions, n_items - 1)


# ------------------------------------------------------------------------------------------------
# 7. Training loop shared by 03, 04 and 05
# ------------------------------------------------------------------------------------------------

def save_checkpoint(obj: dict, path: Path) -> Path:
    """torch.save a plain dict atomically: a crash mid-write never leaves a truncated checkpoint."""
    import torch
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def load_checkpoint(path: Path) -> dict:
    """Load with weights_only=True: a checkpoint can carry tensors and primitives, never code."""
    import torch
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found; train it first (run_all.py, or the stage "
                         "that writes it) or pass --models with the right outputs folder")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, pickle with code, wrong format
        raise InputError(f"{path}: cannot load the checkpoint ({type(error).__name__}: {error}); "
                         "delete it and retrain") from None


def load_trained_model(path: Path, device="cpu"):
    """Rebuild a model saved by 03/04/05 from its best.pt and return (model in eval mode, checkpoint).

    The checkpoint says what it is: kind 'classifier' (arch, num_classes) or 'boneage'
    (arch, max_months); weights are the unwrapped model's state_dict.
    """
    checkpoint = load_checkpoint(path)
    if checkpoint.get("kind") == "boneage":
        model = build_boneage_model(checkpoint["arch"], max_months=checkpoint["max_months"])
    else:
        model = create_model(checkpoint["arch"], num_classes=checkpoint["num_classes"],
                             image_size=checkpoint.get("image_size"))
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval(), checkpoint


def load_init_weights(model, path) -> dict:
    """Start `model` from a checkpoint of this project (fine-tuning, e.g. a GRAZPEDWRI-DX model on a
    hospital's images): copy every tensor whose name and shape match; return the checkpoint.

    best.pt holds the weights under `state_dict`, last.pt under `model`; loaded with
    weights_only=True. A head of another size (4 age groups -> 1 fracture logit) is skipped and
    said in one log line. Fewer than half of the model's tensors matching means another
    architecture: an error, because a model silently left mostly random is not a fine-tune.
    """
    checkpoint = load_checkpoint(Path(path))
    weights = checkpoint.get("state_dict", checkpoint.get("model")) if isinstance(checkpoint, dict) else None
    if not isinstance(weights, dict):
        raise InputError(f"{path}: no model weights in it (no state_dict or model key); give the "
                         "best.pt or last.pt of a 03/04/05 run")
    own = model.state_dict()
    matching = {name: tensor for name, tensor in weights.items()
                if name in own and hasattr(tensor, "shape") and tuple(tensor.shape) == tuple(own[name].shape)}
    if not matching or len(matching) < len(own) / 2:
        raise InputError(f"{path}: only {len(matching)} of the model's {len(own)} tensors match by name and "
                         f"shape (trained as {checkpoint.get('arch', '?')}); pass --arch "
                         f"{checkpoint.get('arch', 'of that run')} or another checkpoint")
    model.load_state_dict(matching, strict=False)
    skipped = sorted(name for name in own if name not in matching)
    log(f"init from {path}: {len(matching)} of {len(own)} tensors loaded"
        + (f"; kept fresh (shape or name differs): {', '.join(skipped)}" if skipped else ""))
    return checkpoint


class CachedImageDataset:
    """Rows of the preprocess-once cache plus per-row values (target, sex, ...).

    Per-sample work is one memory-mapped slice: decoding, resizing and augmentation happen
    elsewhere (once at cache build; on whole batches on the device). The memmap is opened lazily
    in each loader worker because pickling an open memmap would copy the whole array.
    """

    def __init__(self, cache: ImageCache, paths: Sequence[str], **values: Sequence):
        self.array_path = cache.array_path
        self.rows = cache.rows_for(paths)
        self.values = {name: np.asarray(v) for name, v in values.items()}
        self._array = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        import torch
        if self._array is None:
            self._array = np.load(self.array_path, mmap_mode="r")
        item = {"image": torch.from_numpy(np.array(self._array[self.rows[i]])).unsqueeze(0), "index": i}
        for name, column in self.values.items():
            item[name] = torch.as_tensor(column[i])
        return item

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_array"] = None
        return state


def augment_batch(images):
    """Random affine (rotation +-10 deg, scale +-10%, shift +-5%, left/right flip) and
    brightness/contrast on a whole [B,1,H,W] batch in [0,1], on whatever device it lives on.

    Batch-wise on the GPU it costs almost nothing, where per-image CPU augmentation would need
    many loader cores. A left/right flip is a plausible wrist (left and right hands mirror).
    """
    torch, _, F = _torch_modules()
    batch = images.shape[0]
    device = images.device

    def uniform(low, high, *shape):
        return torch.empty(*(shape or (batch,)), device=device).uniform_(low, high)

    angle = uniform(-math.radians(10), math.radians(10))
    scale = uniform(0.9, 1.1)
    flip = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0)
    shift = uniform(-0.1, 0.1, batch, 2)  # affine_grid coordinates span 2, so 0.1 = 5%
    theta = torch.stack([
        torch.stack([torch.cos(angle) * flip / scale, -torch.sin(angle) / scale, shift[:, 0]], 1),
        torch.stack([torch.sin(angle) * flip / scale, torch.cos(angle) / scale, shift[:, 1]], 1),
    ], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    contrast = uniform(0.85, 1.15).view(-1, 1, 1, 1)
    brightness = uniform(-0.08, 0.08).view(-1, 1, 1, 1)
    mean = images.mean(dim=(2, 3), keepdim=True)
    return ((images - mean) * contrast + mean + brightness).clamp_(0.0, 1.0)


def prepare_images(images_uint8, device, *, train: bool, channels_last: bool):
    """uint8 [B,1,H,W] from the loader -> normalised float on the device (augmented if training)."""
    import torch
    images = images_uint8.to(device, non_blocking=True).float().div_(255.0)
    if train:
        images = augment_batch(images)
    images = (images - PIXEL_MEAN) / PIXEL_STD
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


@dataclass
class TrainSettings:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    patience: int = 5
    grad_clip: float = 1.0
    workers: int = 0
    compile: bool = False
    monitor: str = "auc"        # key of the dict the evaluate callback returns
    mode: str = "max"           # "max" for AUC/accuracy, "min" for MAE
    seed: int = 42
    min_epoch_samples: int = 0  # small training sets are cycled up to this many draws per epoch

    def identity(self) -> dict:
        """The settings that change the result (not workers or compile): resume only if equal."""
        return {k: v for k, v in asdict(self).items() if k not in ("workers", "compile")}


@dataclass
class EarlyStopping:
    mode: str
    patience: int
    best: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0

    def update(self, value: float, epoch: int) -> bool:
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if better:
            self.best, self.best_epoch, self.bad_epochs = float(value), epoch, 0
        else:
            self.bad_epochs += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience


def make_loader(dataset, *, batch_size: int, sampler=None, workers: int, device, shuffle=False):
    import torch
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, shuffle=shuffle, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0, drop_last=False)


def predict(model, dataset, forward: Callable, *, batch_size: int, info: DistInfo,
            workers: int = 0, channels_last: bool = False) -> np.ndarray:
    """Run `forward` over the whole dataset, sharded across ranks, gathered on every rank.

    Returns outputs in dataset order, each item exactly once (the padding that evens the shards
    out is dropped by index), so metrics are computed over the whole set, not per rank.
    """
    import torch
    positions = shard_for_eval(len(dataset), info.rank, info.world_size)
    subset = torch.utils.data.Subset(dataset, positions.tolist())
    loader = make_loader(subset, batch_size=batch_size, workers=workers, device=info.device)
    outputs, indices = [], []
    model.eval()
    with torch.no_grad(), torch.autocast(info.device.type, dtype=torch.bfloat16,
                                         enabled=info.device.type == "cuda"):
        for batch in loader:
            images = prepare_images(batch["image"], info.device, train=False, channels_last=channels_last)
            outputs.append(forward(model, images, batch).float())
            indices.append(batch["index"].to(info.device))
    local_out = torch.cat(outputs) if outputs else torch.empty(0, device=info.device)
    local_idx = torch.cat(indices) if indices else torch.empty(0, dtype=torch.long, device=info.device)
    all_out = gather_rows(local_out, info.device).cpu().numpy()
    all_idx = gather_rows(local_idx, info.device).cpu().numpy()
    result = np.zeros((len(dataset), *all_out.shape[1:]), dtype=np.float32)
    result[all_idx] = all_out
    assert set(all_idx.tolist()) == set(range(len(dataset))), "every item must be predicted once"
    return result


def fit(model, train_set, train_labels: Sequence[int], *, forward: Callable, loss_fn: Callable,
        evaluate: Callable[[object], dict], settings: TrainSettings, info: DistInfo, run_dir: Path,
        checkpoint_meta: dict, balanced: bool) -> dict:
    """Train with AdamW + warmup/cosine, gradient clipping, early stopping, resumable from last.pt.

    forward(model, images, batch) -> outputs; loss_fn(outputs, batch) -> scalar;
    evaluate(model) -> dict of validation metrics (called on every rank: it gathers).
    Writes run_dir/best.pt (the best weights), last.pt (everything needed to resume),
    history.csv and, for the first epoch this process trains, sample_audit.json (which dataset
    indices each rank drew). Returns {"best": {...}, "history": [...]} with the best weights loaded.
    """
    import torch
    from torch.nn.parallel import DistributedDataParallel
    run_dir = Path(run_dir)
    on_cuda = info.device.type == "cuda"
    model = model.to(info.device)
    if on_cuda:
        model = model.to(memory_format=torch.channels_last)
    # --batch-size is the GLOBAL batch: each of W ranks takes B/W of it, so 1 and N processes
    # step through the same batches with the same learning-rate schedule. Every batch is full
    # (a BatchNorm batch of one sample would fail) and every rank gets the same number of them.
    rank_batch = max(1, settings.batch_size // info.world_size)
    per_rank = max(len(train_set), settings.min_epoch_samples) // info.world_size
    per_rank = per_rank // rank_batch * rank_batch or per_rank
    sampler = EpochSampler(train_labels, balanced=balanced, rank=info.rank, world_size=info.world_size,
                           seed=settings.seed, epoch_size=per_rank * info.world_size)
    loader = make_loader(train_set, batch_size=rank_batch, sampler=sampler,
                         workers=settings.workers, device=info.device)
    steps_per_epoch = max(1, len(loader))
    optimizer = _make_optimizer(model, settings, on_cuda)
    scheduler = _warmup_cosine(optimizer, int(settings.warmup_epochs * steps_per_epoch),
                               settings.epochs * steps_per_epoch)
    early = EarlyStopping(settings.mode, settings.patience)
    history: list[dict] = []
    start_epoch, best_state = _resume(run_dir, checkpoint_meta, model, optimizer, scheduler, early, history, info)

    train_model = DistributedDataParallel(model, device_ids=[info.device.index] if on_cuda else None) \
        if info.distributed else model
    if settings.compile:
        train_model = torch.compile(train_model)
    crash_epoch = int(os.environ.get("PIPELINE_CRASH_AFTER_EPOCH", "0"))  # for resume tests only
    audited = False
    for epoch in range(start_epoch, settings.epochs):
        if early.should_stop:
            break
        sampler.set_epoch(epoch)
        # Augmentation randomness differs per rank and per epoch, and is reproducible on resume.
        torch.manual_seed(settings.seed * 100_003 + epoch * 1_009 + info.rank)
        model.train()
        start = time.perf_counter()
        loss_sum, seen, drawn = 0.0, 0, []
        for batch in progress(loader, desc=f"epoch {epoch + 1}/{settings.epochs}", leave=False, unit="batch"):
            images = prepare_images(batch["image"], info.device, train=True, channels_last=on_cuda)
            with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=on_cuda):
                outputs = forward(train_model, images, batch)
            targets = {k: v.to(info.device, non_blocking=True) for k, v in batch.items() if k != "image"}
            loss = loss_fn(outputs.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(images)
            seen += len(images)
            if not audited:
                drawn.append(batch["index"])
        if on_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        loss_total, seen_total = all_reduce_sum([loss_sum, seen], info.device)
        if not audited:
            _write_sample_audit(run_dir, epoch, drawn, info, sampler)
            audited = True
        recalibrate_batchnorm(model, train_set, forward, batch_size=rank_batch, info=info, seed=settings.seed)
        val = evaluate(model)
        improved = early.update(val[settings.monitor], epoch)
        if improved:
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        row = {"epoch": epoch + 1, "train_loss": loss_total / max(seen_total, 1),
               **{f"val_{k}": v for k, v in val.items() if isinstance(v, (int, float))},
               "lr": optimizer.param_groups[0]["lr"], "images_per_s": seen_total / max(seconds, 1e-9),
               "samples_seen": int(seen_total) + (int(history[-1]["samples_seen"]) if history else 0),
               "seconds": seconds}
        history.append(row)
        if info.is_main:
            if improved:
                save_checkpoint({**checkpoint_meta, "state_dict": best_state, "epoch": epoch + 1,
                                 "val": _primitives(val)}, run_dir / "best.pt")
            save_checkpoint({"meta": checkpoint_meta, "model": model.state_dict(),
                             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "epoch": epoch + 1, "early": asdict(early), "history": history,
                             "torch_rng": torch.get_rng_state()}, run_dir / "last.pt")
            write_csv(pd.DataFrame(history), run_dir / "history.csv")
        log(f"epoch {epoch + 1:3d}/{settings.epochs}  loss {row['train_loss']:.4f}  "
            f"val {settings.monitor} {val[settings.monitor]:.4f}{' *' if improved else '  '}  "
            f"lr {row['lr']:.2e}  {row['images_per_s']:.0f} img/s")
        if crash_epoch and epoch + 1 == crash_epoch and info.rank == int(os.environ.get("PIPELINE_CRASH_RANK", "0")):
            log(f"PIPELINE_CRASH_AFTER_EPOCH={crash_epoch}: exiting on purpose to test resume")
            sys.stdout.flush()
            os._exit(17)
    if best_state is not None:
        model.load_state_dict(best_state)
    return {"best": {"epoch": early.best_epoch + 1, settings.monitor: early.best}, "history": history}


def recalibrate_batchnorm(model, dataset, forward: Callable, *, batch_size: int, info: DistInfo,
                          seed: int, max_images: int = 512) -> None:
    """Re-estimate BatchNorm statistics on un-augmented training images (no-op without BatchNorm).

    BatchNorm's running statistics are collected on augmented batches, but predictions are made
    on clean images; the mismatch shifted a bone-age ResNet's validation predictions by +22.5
    months (MAE 22.7 -> 7.6 after this). The draw is seeded and the same on every rank, so all
    ranks end with identical statistics without a collective.
    """
    import torch
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    draw = np.random.default_rng(seed).permutation(len(dataset))[:max_images]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, draw.tolist()),
                                         batch_size=batch_size, drop_last=len(draw) > batch_size)
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a plain average over the batches below, not a moving one
    model.train()
    with torch.no_grad(), torch.autocast(info.device.type, dtype=torch.bfloat16,
                                         enabled=info.device.type == "cuda"):
        for batch in loader:
            forward(model, prepare_images(batch["image"], info.device, train=False,
                                          channels_last=info.device.type == "cuda"), batch)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.eval()


def split_fingerprint(frames: dict[str, pd.DataFrame], key: str) -> dict[str, str]:
    """A short hash of each split's ids, kept in checkpoints: after 01/02 are rerun, a new split
    must not resume weights that may have trained on images now in its test set."""
    import hashlib
    return {split: hashlib.sha1(",".join(sorted(frame[key].astype(str))).encode()).hexdigest()[:16]
            for split, frame in frames.items()}


def _make_optimizer(model, settings: TrainSettings, on_cuda: bool):
    """AdamW; no weight decay on biases, norms and GeM's exponent (1-D parameters)."""
    import torch
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": settings.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, fused=on_cuda)


def _warmup_cosine(optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup then cosine decay to 1% of the peak, stepped once per batch."""
    import torch

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress_ = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _resume(run_dir: Path, meta: dict, model, optimizer, scheduler, early: EarlyStopping,
            history: list, info: DistInfo):
    """Continue from last.pt when it was written with the same settings; otherwise start fresh."""
    last = run_dir / "last.pt"
    start_epoch, best_state = 0, None
    if last.is_file():
        state = load_checkpoint(last)
        if state.get("meta") == meta:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            for key, value in state["early"].items():
                setattr(early, key, value)
            history.extend(state["history"])
            start_epoch = int(state["epoch"])
            if (run_dir / "best.pt").is_file():
                best_state = load_checkpoint(run_dir / "best.pt")["state_dict"]
            log(f"resuming {run_dir} from last.pt after epoch {start_epoch}")
        else:
            log(f"{last}: written with other settings; training from scratch")
    agreed = broadcast_object(start_epoch)
    if agreed != start_epoch:
        raise InputError(f"{run_dir}: ranks disagree on where to resume ({agreed} vs {start_epoch}); "
                         "--out must be one folder shared by every node")
    return start_epoch, best_state


def _write_sample_audit(run_dir: Path, epoch: int, drawn: list, info: DistInfo, sampler: EpochSampler) -> None:
    """Record which dataset indices each rank trained on in one epoch (checked by the DDP test)."""
    import torch
    local = torch.cat(drawn) if drawn else torch.empty(0, dtype=torch.long)
    gathered = gather_rows(local, info.device).numpy().reshape(info.world_size, -1)
    if info.is_main:
        write_json({"epoch": epoch + 1, "world_size": info.world_size, "balanced": sampler.balanced,
                    "intended_samples": sampler.per_rank * info.world_size,
                    "indices_by_rank": gathered.tolist()}, run_dir / "sample_audit.json")


def _primitives(values: dict) -> dict:
    return json.loads(json.dumps(values, default=_json_default))


# ------------------------------------------------------------------------------------------------
# 8. Metrics and plots
# ------------------------------------------------------------------------------------------------

def youden_threshold(labels: Sequence[int], probs: Sequence[float]) -> float:
    """The threshold maximising sensitivity + specificity - 1 on the given (validation) set.

    Chosen on validation and applied unchanged to test, so the test figures stay honest.
    """
    from sklearn.metrics import roc_curve
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=float)
    if len(np.unique(labels)) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(labels, probs)
    best = int(np.argmax(tpr - fpr))
    return float(min(max(thresholds[best], 0.0), 1.0))


def binary_metrics(labels: Sequence[int], probs: Sequence[float], threshold: float) -> dict:
    """ROC AUC, PR AUC, accuracy, F1, sensitivity, specificity and the confusion matrix at a threshold."""
    from sklearn.metrics import (accuracy_score, average_precision_score, confusion_matrix,
                                 f1_score, roc_auc_score)
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=float)
    predicted = (probs >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    both = len(np.unique(labels)) == 2
    return {
        "auc": float(roc_auc_score(labels, probs)) if both else float("nan"),
        "pr_auc": float(average_precision_score(labels, probs)) if both else float("nan"),
        "accuracy": float(accuracy_score(labels, predicted)),
        "f1": float(f1_score(labels, predicted, zero_division=0)),
        "sensitivity": float(tp / (tp + fn)) if tp + fn else float("nan"),
        "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
        "threshold": float(threshold),
        "n": int(len(labels)), "n_positive": int(labels.sum()),
        "confusion": [[int(tn), int(fp)], [int(fn), int(tp)]],
    }


def bootstrap_ci(metric: Callable[[np.ndarray, np.ndarray], float], y_true, y_score, groups,
                 n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap CI resampling PATIENTS, not images.

    A patient's images are correlated (same bones, often the same fracture in AP and Lat);
    resampling images would treat them as independent and give too narrow an interval.
    Resamples where the metric is undefined (one class only) are skipped.
    """
    y_true, y_score, groups = np.asarray(y_true), np.asarray(y_score), np.asarray(groups)
    unique, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(unique))]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        chosen = rng.integers(0, len(unique), len(unique))
        rows = np.concatenate([members[g] for g in chosen])
        if len(np.unique(y_true[rows])) < 2 and metric.__name__ == "roc_auc_score":
            continue  # AUC is undefined on a resample with one class
        try:
            value = metric(y_true[rows], y_score[rows])
        except ValueError:
            continue
        if np.isfinite(value):
            values.append(value)
    if len(values) < n_boot // 2:
        return [float("nan"), float("nan")]
    tail = (1 - level) / 2 * 100
    return [float(v) for v in np.percentile(values, [tail, 100 - tail])]


def auc_with_ci(labels, probs, patients, n_boot: int = 1000, seed: int = 0) -> tuple[float, list[float]]:
    from sklearn.metrics import roc_auc_score
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return float("nan"), [float("nan"), float("nan")]
    return float(roc_auc_score(labels, probs)), bootstrap_ci(roc_auc_score, labels, probs, patients, n_boot, seed)


# -- Shared evaluation functions (interfaces.md). Minimal versions so 07's external validation runs
# -- on this branch; the evaluation branch owns these names and its copies replace these at merge.

def binary_metrics_with_ci(labels, probs, patients, threshold: float, n_boot: int = 1000, seed: int = 0,
                           prevalence: float | None = None) -> dict:
    """AUC, sensitivity, specificity, PPV, NPV, F1, accuracy at `threshold`, each with a
    patient-bootstrap 95% percentile interval (<name>_lo, <name>_hi)."""
    from sklearn.metrics import roc_auc_score
    labels, probs = np.asarray(labels).astype(int), np.asarray(probs, dtype=float)

    def at_threshold(y, p) -> dict:
        predicted = p >= threshold
        tp, fp = int((predicted & (y == 1)).sum()), int((predicted & (y == 0)).sum())
        fn, tn = int((~predicted & (y == 1)).sum()), int((~predicted & (y == 0)).sum())
        ratio = lambda a, b: a / b if b else float("nan")  # noqa: E731
        return {"auc": float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan"),
                "sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
                "ppv": ratio(tp, tp + fp), "npv": ratio(tn, tn + fn),
                "f1": ratio(2 * tp, 2 * tp + fp + fn), "accuracy": ratio(tp + tn, len(y))}

    result = {"n": int(len(labels)), "n_pos": int(labels.sum()), "threshold": float(threshold)}
    point = at_threshold(labels, probs)
    # One pass per resample for all metrics (as bootstrap_ci: whole patients are resampled).
    _, inverse = np.unique(np.asarray(patients), return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)] if len(labels) else []
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot if members else 0):
        rows = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        draws.append(at_threshold(labels[rows], probs[rows]))
    for name, value in point.items():
        values = np.array([d[name] for d in draws], dtype=float)
        values = values[np.isfinite(values)]
        low, high = np.percentile(values, [2.5, 97.5]) if len(values) >= max(1, n_boot // 2) else (np.nan, np.nan)
        result.update({name: value, f"{name}_lo": float(low), f"{name}_hi": float(high)})
    if prevalence is not None:
        sens, spec = point["sensitivity"], point["specificity"]
        result["prevalence"] = float(prevalence)
        result["ppv_at_prevalence"] = sens * prevalence / (sens * prevalence + (1 - spec) * (1 - prevalence))
        result["npv_at_prevalence"] = spec * (1 - prevalence) / (spec * (1 - prevalence) + (1 - sens) * prevalence)
    return result


def study_table(images: pd.DataFrame, prob_column: str, decision_column: str) -> pd.DataFrame:
    """One row per study (patient_id, study_id, laterality): max probability, decision 1 if ANY image's is."""
    keys = ["patient_id", "study_id", "laterality"]
    aggregations = {"n_images": (prob_column, "size"), "prob": (prob_column, "max"),
                    "decision": (decision_column, "max")}
    if "label" in images:
        aggregations["label"] = ("label", "max")
    studies = images.groupby(keys, as_index=False, sort=True, dropna=False).agg(**aggregations)
    studies["decision"] = studies["decision"].astype(int)
    return studies


def calibration_metrics(labels, probs, n_bins: int = 10) -> dict:
    """Brier score and expected calibration error over equal-width probability bins."""
    labels, probs = np.asarray(labels, dtype=float), np.asarray(probs, dtype=float)
    bins = np.minimum((probs * n_bins).astype(int), n_bins - 1)
    ece = sum(abs(labels[bins == b].mean() - probs[bins == b].mean()) * (bins == b).mean()
              for b in range(n_bins) if (bins == b).any())
    return {"brier": float(np.mean((probs - labels) ** 2)), "ece": float(ece)}


def plot_reliability(curves: dict, path: Path, title: str) -> Path:
    from sklearn.calibration import calibration_curve
    plt = _figure()
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    for name, (labels, probs) in curves.items():
        if len(np.unique(labels)) == 2:
            observed, predicted = calibration_curve(labels, probs, n_bins=10, strategy="quantile")
            ax.plot(predicted, observed, "o-", label=name)
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set(xlabel="predicted probability", ylabel="observed fracture fraction", title=title,
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="upper left")
    return save_figure(fig, path)


def plot_pr(labels, probs, path: Path, title: str) -> Path:
    from sklearn.metrics import average_precision_score, precision_recall_curve
    plt = _figure()
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    if len(np.unique(labels)) == 2:
        precision, recall, _ = precision_recall_curve(labels, probs)
        ax.plot(recall, precision, lw=2, label=f"AP {average_precision_score(labels, probs):.3f}")
        ax.axhline(np.mean(labels), ls="--", color="grey", lw=1, label="prevalence")
        ax.legend(loc="lower left")
    ax.set(xlabel="sensitivity (recall)", ylabel="PPV (precision)", title=title, xlim=(0, 1), ylim=(0, 1.01))
    return save_figure(fig, path)


def mean_absolute_error(true, predicted) -> float:
    return float(np.mean(np.abs(np.asarray(true, dtype=float) - np.asarray(predicted, dtype=float))))


def _figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path) -> Path:
    plt = _figure()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format=Path(path).suffix.lstrip(".") or "png")
    plt.close(fig)
    return Path(path)


def plot_roc(labels, probs, path: Path, title: str, threshold: float | None = None) -> Path:
    from sklearn.metrics import roc_curve, roc_auc_score
    plt = _figure()
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    if len(np.unique(labels)) == 2:
        fpr, tpr, _ = roc_curve(labels, probs)
        ax.plot(fpr, tpr, lw=2, label=f"AUC {roc_auc_score(labels, probs):.3f}")
        if threshold is not None:
            predicted = np.asarray(probs) >= threshold
            labels_ = np.asarray(labels).astype(bool)
            ax.plot([(predicted & ~labels_).sum() / max((~labels_).sum(), 1)],
                    [(predicted & labels_).sum() / max(labels_.sum(), 1)], "o", color="black",
                    label=f"threshold {threshold:.2f}")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    return save_figure(fig, path)


def plot_confusion(matrix, class_names: Sequence[str], path: Path, title: str) -> Path:
    plt = _figure()
    matrix = np.asarray(matrix)
    size = max(3.2, 0.9 * len(class_names) + 1.5)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center",
                color="white" if count > matrix.max() / 2 else "black")
    ax.set_xticks(range(len(class_names)), class_names, rotation=30)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return save_figure(fig, path)


def plot_scatter(true, predicted, path: Path, title: str, unit: str = "months") -> Path:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(4.4, 4.4))
    ax.scatter(true, predicted, s=8, alpha=0.6)
    low, high = float(np.min(true)), float(np.max(true))
    ax.plot([low, high], [low, high], "--", color="grey", lw=1)
    ax.set(xlabel=f"true ({unit})", ylabel=f"predicted ({unit})",
           title=f"{title}\nMAE {mean_absolute_error(true, predicted):.1f} {unit}")
    return save_figure(fig, path)


def plot_bland_altman(true, predicted, path: Path, title: str, unit: str = "months") -> Path:
    plt = _figure()
    true, predicted = np.asarray(true, dtype=float), np.asarray(predicted, dtype=float)
    mean, diff = (true + predicted) / 2, predicted - true
    bias, spread = diff.mean(), 1.96 * diff.std(ddof=1) if len(diff) > 1 else 0.0
    fig, ax = plt.subplots(figsize=(5, 3.8))
    ax.scatter(mean, diff, s=8, alpha=0.6)
    for value, style in ((bias, "-"), (bias + spread, "--"), (bias - spread, "--")):
        ax.axhline(value, color="grey", ls=style, lw=1)
    ax.set(xlabel=f"mean of true and predicted ({unit})", ylabel=f"predicted - true ({unit})",
           title=f"{title}\nbias {bias:+.1f}, limits of agreement +-{spread:.1f} {unit}")
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------------
# 9. Report
# ------------------------------------------------------------------------------------------------

def write_report(out: Path, commands: Sequence[str] = ()) -> Path:
    """Write OUT/REPORT.md: one page that explains a run from whatever the stages left in OUT.

    Any stage may call it; sections whose outputs do not exist yet say so instead of failing.
    """
    out = Path(out)
    lines = ["# Pediatric wrist radiograph pipeline: run report", "",
             f"Written {time.strftime('%Y-%m-%d %H:%M')} from the outputs in `{out.name}/`. "
             "Every figure below is read from the files the stages wrote; test metrics use a "
             "patient-exclusive test set and thresholds chosen on validation.", ""]
    lines += _report_splits(out) + _report_age(out) + _report_fracture(out) + _report_boneage(out)
    lines += _report_gradcam(out)
    lines += ["## Reproduce", "", "Commands run, in order:", "", "```",
              *(commands or ["(not recorded: the report was written by a single stage)"]), "```", "",
              "Library versions: " + ", ".join(f"{k} {v}" for k, v in library_versions().items()), ""]
    with atomic_path(out / "REPORT.md") as tmp:
        tmp.write_text("\n".join(lines))
    return out / "REPORT.md"


def _report_splits(out: Path) -> list[str]:
    report = out / "splits" / "split_report.md"
    if not report.is_file():
        return ["## Data and splits", "", "_Not run yet (01/02)._", ""]
    body = report.read_text().strip().splitlines()
    # Demote the split report's headings by one level so they nest under this section.
    body = [("#" + line) if line.startswith("#") else line for line in body]
    return ["## Data and splits", "", *body, ""]


def _report_age(out: Path) -> list[str]:
    path = out / "age" / "metrics.json"
    if not path.is_file():
        return ["## Age-group router (03)", "", "_Not run yet._", ""]
    metrics = read_json(path)
    test, val = metrics["test"], metrics.get("val", {})
    return ["## Age-group router (03)", "",
            f"Groups: {', '.join(metrics.get('group_names', []))}. "
            f"Test accuracy **{test['accuracy']:.3f}**, macro F1 {test['macro_f1']:.3f} (n = {test['n']}); "
            f"validation accuracy {val.get('accuracy', float('nan')):.3f}.", "",
            "![age router confusion matrix](age/confusion.png)", ""]


def _report_fracture(out: Path) -> list[str]:
    path = out / "fracture" / "summary.csv"
    if not path.is_file():
        return ["## Fracture models (04)", "", "_Not run yet._", ""]
    summary = pd.read_csv(path)
    lines = ["## Fracture models (04)", "",
             "Test AUC with patient-level bootstrap 95% CI; sensitivity and specificity at the "
             "threshold chosen on validation (Youden's J).", "",
             "| model | status | n test (fracture) | AUC [95% CI] | sensitivity | specificity | threshold | plots |",
             "|---|---|---|---|---|---|---|---|"]
    for row in summary.to_dict("records"):
        if row["kind"] == "model":
            name = f"{row['projection']} group {int(row['age_group'])}"
            folder = f"fracture/{row['projection']}/group{int(row['age_group'])}"
            plots = f"[ROC]({folder}/roc.png), [confusion]({folder}/confusion.png)" if row["status"] == "trained" else ""
        else:
            name, plots = row["kind"].replace("_", " "), ""
        if row["status"] == "skipped":
            lines.append(f"| {name} | skipped: {row['reason']} | | | | | | |")
            continue
        lines.append(f"| {name} | {row['status']} | {int(row['n_test'])} ({int(row['pos_test'])}) | "
                     f"{row['test_auc']:.3f} [{row['test_auc_ci_low']:.3f}, {row['test_auc_ci_high']:.3f}] | "
                     f"{_fmt(row.get('test_sensitivity'))} | {_fmt(row.get('test_specificity'))} | "
                     f"{_fmt(row.get('test_threshold'))} | {plots} |")
    return lines + ["", "Cascade rows route every test image to the model of its true (or 03-predicted) "
                    "age group; the study row scores a study by its most suspicious image (AP and Lat "
                    "together). Per-image probabilities: `fracture/test_predictions.csv`.", ""]


def _fmt(value) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def _report_boneage(out: Path) -> list[str]:
    path = out / "boneage" / "metrics.json"
    if not path.is_file():
        return ["## Bone age (05)", "", "_Not run yet._", ""]
    test = read_json(path)["test"]
    ci = test.get("mae_ci", [float("nan")] * 2)
    return ["## Bone age (05)", "",
            f"Test MAE **{test['mae']:.1f} months** [95% CI {ci[0]:.1f}, {ci[1]:.1f}] on {test['n']} images; "
            f"predicting the training mean gives {test['baseline_mae']:.1f} months.", "",
            "![predicted vs true](boneage/scatter.png) ![Bland-Altman](boneage/bland_altman.png)", ""]


def _report_gradcam(out: Path) -> list[str]:
    path = out / "gradcam" / "index.csv"
    if not path.is_file():
        return ["## Grad-CAM++ (06)", "", "_Not run yet._", ""]
    index = pd.read_csv(path)
    grids = sorted((out / "gradcam").glob("*/*/grid.png"))
    return ["## Grad-CAM++ (06)", "",
            f"{len(index)} overlays (true positives, false positives and false negatives first); "
            "list in `gradcam/index.csv`.", "",
            *[f"![{g.parent.parent.name} {g.parent.name}]({g.relative_to(out).as_posix()})" for g in grids], ""]


# ------------------------------------------------------------------------------------------------
# 10. External validation: a run's models on a hospital's labelled images (07_predict)
# ------------------------------------------------------------------------------------------------

EVALUATION_SUBGROUPS = ["projection", "age_group_name", "age_group_source", "sex", "laterality"]


def evaluate_external(images: pd.DataFrame, skipped: pd.DataFrame, out_dir: Path, *, n_boot: int = 1000,
                      seed: int = 0) -> dict:
    """Score predictions against a hospital's labels with the shared metric functions (as 04).

    `images`: one row per labelled input image: label (fracture 0/1) and/or boneage (months),
    patient_id, study_id, laterality, fracture_prob, fracture_pred (at the model's stored
    threshold), threshold, model, bone_age_months, and the subgroup columns. Images without a
    prediction are in `skipped` and counted in the report (leaving them out silently would flatter
    every figure). The thresholds are the ones 04 chose on ITS validation set: nothing here is
    tuned on the hospital's data. Intervals resample patients. Writes evaluation.json,
    EVALUATION.md and, for fractures, subgroups.csv, roc.png, pr.png, reliability.png.
    """
    fractures = images[images["label"].notna() & images["fracture_prob"].notna()] if "label" in images else images[:0]
    hands = (images[images["boneage"].notna() & images["bone_age_months"].notna()]
             if {"boneage", "bone_age_months"} <= set(images) else images[:0])
    if fractures.empty and hands.empty:
        raise InputError(f"{out_dir}: no labelled image got a prediction ({len(skipped)} skipped, see "
                         "skipped.csv); nothing to evaluate")
    result = {"n_skipped": int(len(skipped)),
              "skipped_reasons": {str(k): int(v) for k, v in skipped["reason"].value_counts().items()}}
    subgroups = pd.DataFrame()
    if not fractures.empty:
        result.update(_fracture_evaluation(fractures, n_boot, seed, out_dir))
        subgroups = _subgroup_table(fractures, n_boot, seed)
        write_csv(subgroups, out_dir / "subgroups.csv")
    if not hands.empty:
        result["boneage"] = _bone_age_error(hands, n_boot, seed)
        result.setdefault("n_images", int(len(hands)))
        result.setdefault("n_patients", int(hands["patient_id"].nunique()))
    write_json(result, out_dir / "evaluation.json")
    with atomic_path(out_dir / "EVALUATION.md") as tmp:
        tmp.write_text(_evaluation_markdown(result, subgroups))
    return result


def _fracture_evaluation(images: pd.DataFrame, n_boot: int, seed: int, out_dir: Path) -> dict:
    """Image and study metrics, calibration and the figures of the fracture predictions."""
    labels, probs = images["label"].astype(int).to_numpy(), images["fracture_prob"].astype(float).to_numpy()
    patients = images["patient_id"].astype(str).to_numpy()
    studies = study_table(images.assign(fracture_pred=images["fracture_pred"].astype(int),
                                        fracture_prob=probs, label=labels), "fracture_prob", "fracture_pred")
    studies = studies.astype({"label": int, "prob": float, "decision": int})
    plot_roc(labels, probs, out_dir / "roc.png", "external validation, images")
    plot_pr(labels, probs, out_dir / "pr.png", "external validation, images")
    plot_reliability({"images": (labels, probs), "studies": (studies["label"].to_numpy(),
                                                             studies["prob"].to_numpy())},
                     out_dir / "reliability.png", "calibration (external)")
    return {
        "image": metrics_at_stored_thresholds(labels, probs, images["fracture_pred"], patients, n_boot, seed),
        "study": metrics_at_stored_thresholds(studies["label"], studies["prob"], studies["decision"],
                                              studies["patient_id"].astype(str), n_boot, seed),
        "n_images": int(len(images)), "n_patients": int(len(set(patients))), "n_studies": int(len(studies)),
        "thresholds": {str(m): float(t) for m, t in images.groupby("model")["threshold"].first().items()},
        "calibration": {"image": calibration_metrics(labels, probs),
                        "study": calibration_metrics(studies["label"], studies["prob"])},
    }


def metrics_at_stored_thresholds(labels, probs, decisions, patients, n_boot: int, seed: int) -> dict:
    """binary_metrics_with_ci where each image was decided at ITS model's threshold.

    AP and Lat (and each age group) have their own threshold, so one cut on the pooled
    probabilities would not be the deployed decision. AUC ranks the probabilities; every
    threshold metric is computed on the 0/1 decisions themselves (a 0/1 score cut at 0.5).
    """
    ranked = binary_metrics_with_ci(labels, probs, patients, 0.5, n_boot=n_boot, seed=seed)
    decided = binary_metrics_with_ci(labels, np.asarray(decisions, dtype=float), patients, 0.5,
                                     n_boot=n_boot, seed=seed)
    decided.update({key: ranked[key] for key in ("auc", "auc_lo", "auc_hi")})
    decided["threshold"] = "stored per model"
    return decided


def _bone_age_error(known: pd.DataFrame, n_boot: int, seed: int) -> dict:
    true, predicted = known["boneage"].astype(float).to_numpy(), known["bone_age_months"].astype(float).to_numpy()
    low, high = bootstrap_ci(mean_absolute_error, true, predicted, known["patient_id"].astype(str), n_boot, seed)
    return {"n": int(len(known)), "mae": mean_absolute_error(true, predicted), "mae_lo": low, "mae_hi": high}


def _subgroup_table(images: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    rows = []
    for column in [c for c in EVALUATION_SUBGROUPS if c in images and images[c].notna().any()]:
        for value, part in images.groupby(images[column].fillna("unknown").astype(str), sort=True):
            metrics = metrics_at_stored_thresholds(part["label"].astype(int), part["fracture_prob"].astype(float),
                                                   part["fracture_pred"], part["patient_id"].astype(str),
                                                   n_boot, seed)
            rows.append({"subgroup": column, "value": value, **{k: metrics[k] for k in (
                "n", "n_pos", "auc", "auc_lo", "auc_hi", "sensitivity", "sensitivity_lo", "sensitivity_hi",
                "specificity", "specificity_lo", "specificity_hi")}})
    return pd.DataFrame(rows)


def _with_ci(metrics: dict, name: str) -> str:
    value = metrics.get(name)
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:.3f} [{metrics[f'{name}_lo']:.3f}, {metrics[f'{name}_hi']:.3f}]"


def _evaluation_markdown(result: dict, subgroups: pd.DataFrame) -> str:
    names = ["auc", "sensitivity", "specificity", "ppv", "npv"]
    lines = ["# External validation", "",
             f"{result['n_images']} images of {result['n_patients']} patients were scored; "
             f"{result['n_skipped']} labelled images got no prediction "
             f"({', '.join(f'{n} {r}' for r, n in result['skipped_reasons'].items()) or 'none'}).", ""]
    if "boneage" in result:
        lines += [f"Bone age: MAE {_with_ci(result['boneage'], 'mae')} months on {result['boneage']['n']} images.", ""]
    if "image" not in result:
        return "\n".join(lines)
    lines += [f"Fractures: {result['n_images']} images in {result['n_studies']} studies.",
             "Each image is decided at the threshold its model's training run chose on its own validation "
             "set (nothing is tuned on these images). A study is scored by its most suspicious image and is "
             "positive when any image is. Brackets: 95% intervals from resampling patients.", "",
             "| level | n (positive) | " + " | ".join(n.upper() if len(n) == 3 else n for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for level in ("image", "study"):
        metrics = result[level]
        lines.append(f"| {level} | {metrics['n']} ({metrics['n_pos']}) | "
                     + " | ".join(_with_ci(metrics, n) for n in names) + " |")
    calibration = result["calibration"]
    lines += ["", f"Calibration: Brier {calibration['image']['brier']:.3f} (images), "
                  f"{calibration['study']['brier']:.3f} (studies); ECE {calibration['image']['ece']:.3f} (images).",
              ""]
    if not subgroups.empty:
        lines += ["## Subgroups (images)", "", "| subgroup | value | n (positive) | AUC | sensitivity | specificity |",
                  "|---|---|---|---|---|---|"]
        for row in subgroups.to_dict("records"):
            lines.append(f"| {row['subgroup']} | {row['value']} | {row['n']} ({row['n_pos']}) | "
                         f"{_with_ci(row, 'auc')} | {_with_ci(row, 'sensitivity')} | {_with_ci(row, 'specificity')} |")
        lines.append("")
    lines += ["![ROC](roc.png) ![PR](pr.png) ![reliability](reliability.png)", ""]
    return "\n".join(lines)
