"""Shared code for the pediatric wrist radiograph pipeline: what two or more scripts use.

Every numbered stage imports this one module; copy it next to any stage you reuse elsewhere. What
one stage alone uses lives in that stage. Sections, in order (each header names its users):

1. Data: GRAZPEDWRI-DX `dataset.csv` and the study's filters, hospital tables, RSNA bone-age CSVs,
   image index, splits
2. Age groups (the one definition every stage uses)
3. Models and losses: timm factory, focal loss, GeM, bone-age model
4. Images: one loader for PNG/JPEG (8/16-bit) and DICOM, letterbox, preprocess-once cache
5. Training loop shared by 03, 04 and 05 (resumable, early stopping, bf16 on CUDA, callbacks)
6. Distributed: setup/teardown, DDP-aware sampler, gathering predictions
7. Metrics and plots: patient-bootstrap CIs, calibration, the study rule, figures
8. Experiment tracking: MLflow, shared by the training stages (the run report is 08_report.py)
9. A run's fracture models and Grad-CAM++ overlays (06 and 07)
10. Command line, start-up, errors and small file helpers (atomic writes, run config)

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
BONEAGE_MAX_MONTHS = 240.0

# Input size per preset. 03 and 04 share the wrist size so they share one image cache.
IMAGE_SIZE = {"demo": 64, "full": 384}

# Grey-level normalisation: the mean/std of ImageNet's luminance, because the full preset starts
# from ImageNet weights whose first convolution timm folds to one channel.
PIXEL_MEAN, PIXEL_STD = 0.449, 0.226


# ------------------------------------------------------------------------------------------------
# 1. Data: GRAZPEDWRI-DX dataset.csv and its filters, hospital tables, RSNA bone-age CSVs, splits
#    (01, 02, 03, 04, 05, 06, 07, run_all)
# ------------------------------------------------------------------------------------------------

GRAZ_COLUMNS = ["filestem", "patient_id", "study_number", "timehash", "gender", "age",
                "laterality", "projection", "initial_exam", "ao_classification", "cast",
                "diagnosis_uncertain", "osteopenia", "fracture_visible", "metal", "pixel_spacing",
                "device_manufacturer"]
GRAZ_REQUIRED = ["filestem", "patient_id", "study_number", "gender", "age", "projection",
                 "fracture_visible", "metal", "cast", "ao_classification"]
GRAZ_FLAGS = ["initial_exam", "cast", "diagnosis_uncertain", "osteopenia", "fracture_visible", "metal"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}

# Identifiers are text at every boundary, read exactly as written. Left to guess, pandas reads 12
# as an int from one file and as '12' from a hospital table, and the two never match: 02 then let
# test patients into train while its leak check compared ints with text and passed. It would
# also make '0012' the patient 12, and 12 the float 12.0 (text '12.0') in a column with a gap.
ID_COLUMNS = ("patient_id", "study_id", "study_number", "id")
ID_CONVERTERS = {column: str.strip for column in ID_COLUMNS}  # for pd.read_csv: no parsing, no NaN


def ids_as_text(ids: pd.Series) -> pd.Series:
    """Ids as text whatever dtype a frame arrived with: 12, '12' and 12.0 (pandas' int from a
    column with a gap) are one patient; text, '0012' included, stays as written."""
    if pd.api.types.is_float_dtype(ids) and (ids.dropna() % 1 == 0).all():
        ids = ids.astype("Int64")
    return ids.astype(str)


class ImageIndex(dict):
    """filestem -> image path, plus `duplicates`: stem -> the other files of that stem (ignored)."""

    def __init__(self, found: dict[str, Path], duplicates: dict[str, list[Path]]):
        super().__init__(found)
        self.duplicates = duplicates

    def duplicate_line(self, root: Path) -> str:
        """One line for the exclusion report, or '' when every stem is unique."""
        if not self.duplicates:
            return ""
        stem, others = next(iter(sorted(self.duplicates.items())))
        return (f"{len(self.duplicates)} file stem(s) found more than once under {root} "
                f"({sum(map(len, self.duplicates.values()))} extra file(s) ignored; the first path in "
                f"sorted order is used, e.g. {stem}: {self[stem]} over {others[0]})")


def index_images(root: Path) -> ImageIndex:
    """Map filestem -> image path for every image anywhere under `root`, in ONE walk of the tree.

    Handles images_part1..4/, a merged images/ folder, or any hospital layout. One walk instead of
    one glob per row: 20k globs over a network share take minutes. A stem found twice (a PNG and
    a DICOM, or a file copied into two parts) resolves to the first path in sorted order, not to
    whichever the file system lists first, so every copy of the data picks the same image; the
    others are returned in `.duplicates` for the exclusion report.
    """
    root = Path(root).resolve()  # absolute: split CSVs must stay valid from another folder
    candidates: dict[str, list[Path]] = {}
    for folder, _, files in os.walk(root, followlinks=True):
        for name in files:
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in IMAGE_SUFFIXES and not name.startswith("."):
                candidates.setdefault(stem, []).append(Path(folder) / name)
    found, duplicates = {}, {}
    for stem, paths in candidates.items():
        first, *others = sorted(paths, key=lambda path: path.relative_to(root).as_posix())
        found[stem] = first
        if others:
            duplicates[stem] = others
    return ImageIndex(found, duplicates)


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
        frame = pd.read_csv(csv_path, encoding="utf-8-sig", converters=ID_CONVERTERS, dtype={
                            "filestem": str, "ao_classification": str, "gender": str, "laterality": str})
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as error:
        raise InputError(f"{csv_path}: not a readable CSV ({error}); export it again as "
                         "comma-separated UTF-8") from None
    missing = [c for c in GRAZ_REQUIRED if c not in frame.columns]
    if missing:
        raise InputError(f"{csv_path}: missing required column(s) {', '.join(missing)}; the file "
                         f"needs GRAZPEDWRI-DX's columns: {', '.join(GRAZ_COLUMNS)}")
    _check_ids_present(frame, ["patient_id", "study_number"], csv_path)
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
    kept["study_id"] = kept["study_number"]  # the name hospital tables and 07 use for a study
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
    _check_ids_present(frame, ["patient_id", "study_id"], csv_path)
    paths = table["image_path"].map(lambda given: resolve_table_path(csv_path, given))
    index = {stem: path for stem, path in zip(stems, paths) if path.is_file()}
    return frame, index


def _check_ids_present(frame: pd.DataFrame, columns: list[str], csv_path: Path) -> None:
    """Ids are read as text, so an empty one would silently be one more patient or study."""
    if frame[columns].eq("").any(axis=None):
        raise InputError(f"{csv_path}: empty {' or '.join(columns)}; every image needs both (splits "
                         "keep a patient's images together, studies are scored as a whole)")


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
    """Read a split CSV written by 01/02 (ids as text, as every reader gives them), or say which
    stage to run first."""
    path = split_path(out, dataset, split)
    if not path.is_file():
        stage = "01_split_test.py" if split in ("test", "quarantine") else "02_split_trainval.py"
        raise InputError(f"{path}: split not found; run {stage} (or run_all.py) with the same --out first")
    return pd.read_csv(path, converters=ID_CONVERTERS, dtype={"filestem": str, "ao_classification": str})


def patient_overlap(splits: dict[str, pd.DataFrame], key: str = "patient_id") -> dict[str, int]:
    """Number of patients shared by each pair of splits, e.g. {'test/train': 0, ...}.

    All zeros is the leak check: an image of a test patient in training would let the model
    recognise the patient instead of the fracture, and inflate every test metric.
    """
    names = list(splits)
    ids = {name: set(ids_as_text(frame[key])) for name, frame in splits.items()}
    return {f"{a}/{b}": len(ids[a] & ids[b]) for i, a in enumerate(names) for b in names[i + 1:]}


def assert_no_patient_leak(splits: dict[str, pd.DataFrame], key: str = "patient_id") -> None:
    shared = {pair: n for pair, n in patient_overlap(splits, key).items() if n}
    if shared:
        raise InputError(f"patients shared between splits {shared}; the split CSVs under "
                         "outputs/splits/ were edited or mixed from two runs: rerun 01 and 02")


# ------------------------------------------------------------------------------------------------
# 2. Age groups: the one definition every stage uses (01, 02, 03, 04, 05, 07)
# ------------------------------------------------------------------------------------------------

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


def age_groups_path(out: Path) -> Path:
    return Path(out) / "splits" / "age_groups.json"


def read_age_edges(out: Path) -> tuple[float, ...]:
    """The edges 01_split_test.py chose; every later stage uses these, never its own."""
    path = age_groups_path(out)
    if not path.is_file():
        raise InputError(f"{path}: not found; run 01_split_test.py with the same --out first")
    return tuple(read_json(path)["edges"])


# ------------------------------------------------------------------------------------------------
# 3. Models and losses: timm factory, focal loss, GeM, bone-age model (03, 04, 05, 06, 07)
# ------------------------------------------------------------------------------------------------

# Tiny members of the full preset's families, for tests and CPU smoke runs, in the spirit of timm's
# own test_resnet / test_convnext (timm has none for Swin or ConvNeXtV2): a registered timm
# architecture built with a few blocks of small width. Same code paths (GRN, windowed attention with
# relative-position bias, shifted windows, NHWC features) at a fraction of the cost; no weights.
TINY_FAMILY_MEMBERS = {
    "test_convnextv2": ("convnextv2_atto", {"depths": (1, 1, 1, 1), "dims": (16, 32, 48, 64)}),
    "test_swin": ("swin_tiny_patch4_window7_224", {"embed_dim": 16, "depths": (1, 1, 2, 1),
                                                   "num_heads": (1, 2, 2, 4), "window_size": 4}),
}


def check_architecture(arch: str) -> None:
    import timm
    if arch in TINY_FAMILY_MEMBERS:
        return
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
        # Transformers fix their input size (and position tables). Swin at a size its window does
        # not divide still works: timm shrinks a window larger than its stage's feature map to
        # that map and pads the rest (checked down to 40 px for window 7 and 12).
        kwargs["img_size"] = image_size
    if arch in TINY_FAMILY_MEMBERS:
        if pretrained is not None:
            raise InputError(f"--arch {arch}: a tiny test model has no pretrained weights; drop "
                             "--pretrained or pick a full-size architecture")
        base, overrides = TINY_FAMILY_MEMBERS[arch]
        return timm.create_model(base, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                                 **overrides, **kwargs)
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
    """Focal loss (Lin et al. 2017) for one logit per image, averaged: torchvision's implementation.

    alpha weights the positive class and 1 - alpha the negative one (a real per-class weight, not
    a constant; alpha < 0 switches the weighting off); gamma down-weights easy examples. With
    gamma = 0 this is alpha-weighted BCE. Computed in float32 whatever the autocast dtype.
    """
    from torchvision.ops import sigmoid_focal_loss
    return sigmoid_focal_loss(logits.float(), targets.float(), alpha=alpha if alpha >= 0 else -1,
                              gamma=gamma, reduction="mean")


def build_gem(p: float = 3.0, p_max: float = 6.0, eps: float = 1e-6):
    """Generalised-mean pooling with a learnable exponent p (p=1: average, p->inf: max).

    Small, bright structures (a growth plate, a cortical break) survive GeM better than averaging.
    The exponent is bounded, p = 1 + (p_max - 1) * sigmoid(raw), starting at `p`: a free p can
    drift below 1 (no longer between mean and max) or far above, where x**p overflows in bf16.
    The input is made non-negative by construction, softplus(x), because x**p needs x >= 0 and
    ConvNeXt/Swin features are signed: clamping them at eps (the seed's way) threw away every
    negative activation and its gradient, whereas softplus keeps their order and lets them learn.
    """
    torch, nn, F = _torch_modules()
    fraction = (p - 1.0) / (p_max - 1.0)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"GeM: the initial exponent {p} must lie strictly between 1 and {p_max}")

    class GeM(nn.Module):
        def __init__(self):
            super().__init__()
            self.raw_p = nn.Parameter(torch.tensor(math.log(fraction / (1.0 - fraction))))
            self.p_max, self.eps = p_max, eps

        @property
        def p(self):
            return 1.0 + (self.p_max - 1.0) * torch.sigmoid(self.raw_p)

        def forward(self, x):
            exponent = self.p
            # The clamp only touches softplus outputs below eps (inputs below about -14), where the
            # root's gradient would otherwise be infinite.
            positive = F.softplus(x.float()).clamp(min=self.eps)
            pooled = F.adaptive_avg_pool2d(positive.pow(exponent), 1)
            return pooled.pow(1.0 / exponent).flatten(1)

    return GeM()


def build_boneage_model(arch: str, pretrained: str | None = None, max_months: float = BONEAGE_MAX_MONTHS,
                        init_months: float | None = None, image_size: int | None = None):
    """05's regressor: the side-input model with sex, its output sigmoid x max_months.

    The sigmoid keeps every prediction within [0, max_months]. Sex enters because bone maturation
    differs by sex: the same hand means a different bone age in a girl and a boy. init_months sets
    the head's bias so training starts from the training mean, not 120 months."""
    return build_side_input_model(arch, "sex", pretrained=pretrained, image_size=image_size,
                                  max_output=max_months, init_output=init_months)


AGE_SCALE_YEARS = 20.0  # the age input is divided by this: pediatric ages land in [0, 1]


def build_side_input_model(arch: str, side: str, pretrained: str | None = None, image_size: int | None = None,
                           max_output: float | None = None, init_output: float | None = None, side_dim: int = 16):
    """Backbone features -> GeM -> concat an embedding of one side input -> MLP head -> one output.

    side 'sex' (0 = F, 1 = M; an embedding; 05's bone age) or 'age' (years; a linear map of
    age / AGE_SCALE_YEARS and a GELU; 04's age-conditioned fracture model). The output is the
    logit, or sigmoid x max_output when max_output is given (init_output then sets the head's
    starting bias). `model.side_input` names the input; `model.features` (an identity on the last
    feature map, channels first) is Grad-CAM's target layer whatever the backbone family.

    The backbone is timm's features_only model up to its last stage: it owns no classifier and no
    head norm, so every parameter gets a gradient and DDP needs no find_unused_parameters (the
    whole ConvNeXt with num_classes=0 kept a head norm that forward_features never used, and 05
    died at the second step on 2+ ranks). Swin gives NHWC features and needs its image size.
    """
    torch, nn, _ = _torch_modules()
    if side not in ("sex", "age"):
        raise ValueError(f"side input {side!r}: use 'sex' or 'age'")
    backbone = create_model(arch, num_classes=0, pretrained=pretrained, image_size=image_size,
                            features_only=True, out_indices=(-1,))
    channels = backbone.feature_info.channels()[-1]
    channels_last_output = getattr(backbone, "output_fmt", "NCHW") == "NHWC"

    class SideInputModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = backbone
            self.features = nn.Identity()
            self.pool = build_gem()
            if side == "sex":
                self.sex_embedding = nn.Embedding(2, side_dim)
            else:
                self.age_embedding = nn.Sequential(nn.Linear(1, side_dim), nn.GELU())
            self.head = nn.Sequential(nn.Linear(channels + side_dim, 256), nn.GELU(),
                                      nn.Dropout(0.1), nn.Linear(256, 1))
            self.side_input, self.max_output = side, max_output
            if max_output is not None and init_output is not None:
                fraction = min(max(init_output / max_output, 0.01), 0.99)
                nn.init.constant_(self.head[-1].bias, math.log(fraction / (1 - fraction)))

        def forward(self, images, side_values):
            features = self.backbone(images)[-1]
            if channels_last_output:
                features = features.permute(0, 3, 1, 2)
            pooled = self.pool(self.features(features))
            if side == "sex":
                embedded = self.sex_embedding(side_values.long())
            else:
                embedded = self.age_embedding(side_values.float().unsqueeze(1) / AGE_SCALE_YEARS)
            logit = self.head(torch.cat([pooled, embedded.to(pooled.dtype)], dim=1)).squeeze(1).float()
            return logit if max_output is None else torch.sigmoid(logit) * max_output

    model = SideInputModel()
    model.arch = arch
    return model


# ------------------------------------------------------------------------------------------------
# 4. Images: one loader for PNG/JPEG/DICOM, letterbox, preprocess-once cache (03, 04, 05, 06, 07)
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


def preprocessing_key() -> str:
    """A hash of the code that turns a file into cached pixels: the source of preprocess_image and
    of every function of this module it calls (followed by name, transitively), plus the versions
    of the decoders. The image cache is keyed by it, so any change to the preprocessing invalidates
    the cached pixels by itself; a hand-bumped version number was forgotten and kept stale pixels.
    """
    import hashlib
    import inspect
    from importlib.metadata import PackageNotFoundError, version
    sources: dict[str, str] = {}
    pending = [preprocess_image]
    while pending:
        function = pending.pop()
        if function.__name__ in sources:
            continue
        sources[function.__name__] = inspect.getsource(function)
        pending += [globals()[name] for name in function.__code__.co_names
                    if inspect.isfunction(globals().get(name))]
    digest = hashlib.sha256(json.dumps(sorted(sources.items())).encode())
    for package in ("opencv-python-headless", "opencv-python", "pydicom"):
        try:
            digest.update(f"{package}={version(package)}".encode())
        except PackageNotFoundError:
            continue
    return digest.hexdigest()[:16]


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
    key = preprocessing_key()
    old_entries = _read_cache_index(index_path, array_path, size, key)
    reusable = {p: e for p, e in old_entries.items() if e["stamp"] == stamps.get(p) and p in stamps}
    if len(reusable) == len(wanted):
        _log_builder(f"image cache {array_path.name}: all {len(wanted)} images cached")
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
            tmp_index.write_text(json.dumps({"preprocessing": key, "size": size,
                                             "count": len(order), "entries": entries}))
    _log_builder(f"image cache {array_path.name}: decoded {len(to_decode)} images in {seconds:.1f} s "
        f"({len(to_decode) / max(seconds, 1e-9):.0f} images/s), reused {len(keep)}, "
        f"{len(errors)} unreadable")
    return _cache_from_entries(array_path, size, entries)


def _log_builder(message: str) -> None:
    """The cache is built by local rank 0 of each node, which need not be global rank 0: print
    there, tagged with the node, so a multi-node log shows which node decoded."""
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        node = os.environ.get("GROUP_RANK")
        print(f"[node {node}] {message}" if node and int(os.environ.get("WORLD_SIZE", "1")) > 1
              else message, flush=True)


def _read_cache_index(index_path: Path, array_path: Path, size: int, key: str) -> dict[str, dict]:
    if not (index_path.is_file() and array_path.is_file()):
        return {}
    try:
        index = json.loads(index_path.read_text())
        shape = np.load(array_path, mmap_mode="r").shape
    except (ValueError, OSError):
        return {}
    if index.get("preprocessing") != key or index.get("size") != size or shape != (
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
        # Drop this process's mapping: the next build in the same process reuses the same temporary
        # name for a new file, and a kept mapping would write its pixels into the old one.
        _WORKER_ARRAYS.pop(str(array_path)).flush()
        return errors
    # Not "fork": a process that already runs torch (threads, a gloo group) can fork a child that
    # hangs on a lock another thread held (seen in the test suite). A fork server starts clean.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
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
    """Build the cache on one process per node, then let every rank open it read-only.

    Local rank 0 of each node builds under an exclusive file lock in the cache folder: with one
    --out shared by several nodes, the first node decodes while the others wait for the lock and
    then find every image cached (a per-node --out builds one cache per node, also correct).
    """
    import torch.distributed as dist
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or int(os.environ.get("LOCAL_RANK", "0")) == 0:
        from filelock import FileLock  # flock on POSIX (NFS included), msvcrt on Windows
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        with FileLock(Path(cache_dir) / f".{name}_{size}.lock"):
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
# 5. Training loop: resumable, early stopping, bf16 on CUDA (03, 04, 05; checkpoints 06, 07)
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

    The checkpoint says what it is: kind 'classifier' (arch, num_classes; side_input 'age' for
    04's age-conditioned model) or 'boneage' (arch, max_months); weights are the unwrapped
    model's state_dict.
    """
    checkpoint = load_checkpoint(path)
    if checkpoint.get("kind") == "boneage":
        model = build_boneage_model(checkpoint["arch"], max_months=checkpoint["max_months"],
                                    image_size=checkpoint.get("image_size"))
    elif checkpoint.get("side_input") == "age":
        model = build_side_input_model(checkpoint["arch"], "age", image_size=checkpoint.get("image_size"))
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
    force: bool = False         # ignore last.pt and train from scratch (see _resume)

    def identity(self) -> dict:
        """The settings that change the result (not workers, compile or force): resume only if equal."""
        return {k: v for k, v in asdict(self).items() if k not in ("workers", "compile", "force")}


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
            workers: int = 0, channels_last: bool = True) -> np.ndarray:
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
        checkpoint_meta: dict, balanced: bool, callbacks: Sequence[Callable[[str, dict], None]] = ()) -> dict:
    """Train with AdamW + warmup/cosine, gradient clipping, early stopping, resumable from last.pt.

    forward(model, images, batch) -> outputs; loss_fn(outputs, batch) -> scalar;
    evaluate(model) -> dict of validation metrics (called on every rank: it gathers).
    callbacks: each is called as callback("step", state) after every optimizer step and
    callback("epoch", state) once an epoch's files are written (state: epoch, step, rank, run_dir,
    model); the restart and fail-fast tests inject their faults this way (tests/fault_launcher.py).
    Writes run_dir/best.pt (the best weights), last.pt (everything needed to resume),
    history.csv and, for the first epoch this process trains, sample_audit.json (which dataset
    indices each rank drew). Returns {"best": {...}, "history": [...]} with the best weights loaded.
    """
    import torch
    from torch.nn.parallel import DistributedDataParallel
    run_dir = Path(run_dir)
    on_cuda = info.device.type == "cuda"
    # channels_last (NHWC) on every device: tensor cores on CUDA, oneDNN's NHWC convolutions on
    # the CPU (measured on 2 cores: a test_resnet step at 64 px 98 -> 67 ms, ConvNeXt-Atto the
    # same). Before DDP wraps it: DDP lays its gradient buckets out like the parameters as they are
    # then. (2-rank CPU runs warn "Grad strides do not match" for 1x1 and depthwise kernels
    # whose gradients differ only in the strides of size-1 dimensions: the same bytes, no cost.)
    model = model.to(info.device).to(memory_format=torch.channels_last)
    # --batch-size is the GLOBAL batch, exact for any number of ranks: each rank takes its share
    # of every global batch (shares differ by at most one), so 1 and N processes step through the
    # same batches with the same learning-rate schedule. Every batch is full and every rank runs
    # the same number of steps, so no rank waits in a collective for a step another never takes.
    shares, steps = batch_plan(max(len(train_set), settings.min_epoch_samples), settings.batch_size,
                               info.world_size)
    rank_batch, global_batch = shares[info.rank], sum(shares)
    sampler = EpochSampler(train_labels, balanced=balanced, rank=info.rank, world_size=info.world_size,
                           seed=settings.seed, epoch_size=steps * global_batch, batch_shares=shares)
    loader = make_loader(train_set, batch_size=rank_batch, sampler=sampler,
                         workers=settings.workers, device=info.device)
    optimizer = _make_optimizer(model, settings, on_cuda)
    scheduler = _warmup_cosine(optimizer, int(settings.warmup_epochs * max(1, len(loader))),
                               settings.epochs * max(1, len(loader)))
    early = EarlyStopping(settings.mode, settings.patience)
    history: list[dict] = []
    # last.pt is resumed only if the code, the data and the settings that made it are the same.
    resume_meta = {**checkpoint_meta, "code": code_fingerprint(forward), "data": dataset_fingerprint(train_set)}
    start_epoch, best_state = _resume(run_dir, resume_meta, model, optimizer, scheduler, early, history,
                                      info, force=settings.force)
    train_model = DistributedDataParallel(model, device_ids=[info.device.index] if on_cuda else None) \
        if info.distributed else model
    if settings.compile:
        train_model = torch.compile(train_model)
    # DDP averages gradients over ranks with equal weight; a rank with a larger share must count
    # for more, so each rank's mean loss is scaled by share * W / B (1 when the shares are equal).
    loss_weight = rank_batch * info.world_size / global_batch
    step = _TrainingStep(model, train_model, optimizer, scheduler, forward, loss_fn, settings.grad_clip, loss_weight)
    for epoch in range(start_epoch, settings.epochs):
        if early.should_stop:
            break
        sampler.set_epoch(epoch)
        # Augmentation randomness differs per rank and per epoch, and is reproducible on resume.
        torch.manual_seed(settings.seed * 100_003 + epoch * 1_009 + info.rank)
        state = {"epoch": epoch + 1, "rank": info.rank, "run_dir": run_dir, "model": model}
        loss_sum, seen, drawn, seconds = _train_epoch(step, loader, info, state, callbacks, settings.epochs)
        loss_total, seen_total = all_reduce_sum([loss_sum, seen], info.device)
        if epoch == start_epoch:
            _write_sample_audit(run_dir, epoch, drawn, info, sampler)
        recalibrate_batchnorm(model, train_set, forward, batch_size=rank_batch, info=info, seed=settings.seed)
        val = evaluate(model)
        improved = early.update(val[settings.monitor], epoch)
        if improved:
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        history.append(_history_row(epoch, loss_total, seen_total, seconds, val, optimizer, history, info))
        if info.is_main:
            if improved:
                save_checkpoint({**checkpoint_meta, "state_dict": best_state, "epoch": epoch + 1,
                                 "val": _primitives(val)}, run_dir / "best.pt")
            save_checkpoint({"meta": resume_meta, "model": model.state_dict(),
                             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                             "epoch": epoch + 1, "early": asdict(early), "history": history,
                             "torch_rng": torch.get_rng_state()}, run_dir / "last.pt")
            write_csv(pd.DataFrame(history), run_dir / "history.csv")
        row = history[-1]
        log(f"epoch {epoch + 1:3d}/{settings.epochs}  loss {row['train_loss']:.4f}  "
            f"val {settings.monitor} {val[settings.monitor]:.4f}{' *' if improved else '  '}  "
            f"lr {row['lr']:.2e}  {row['images_per_s']:.0f} img/s")
        for callback in callbacks:
            callback("epoch", state)
    if best_state is not None:
        model.load_state_dict(best_state)
    return {"best": {"epoch": early.best_epoch + 1, settings.monitor: early.best}, "history": history}


@dataclass
class _TrainingStep:
    """What one optimizer step needs: the model (unwrapped, and as trained: DDP and/or compiled),
    its optimizer and schedule, the stage's forward and loss, and this rank's loss weight."""
    model: object
    train_model: object
    optimizer: object
    scheduler: object
    forward: Callable
    loss_fn: Callable
    grad_clip: float
    loss_weight: float


def _train_epoch(step: _TrainingStep, loader, info: DistInfo, state: dict, callbacks, epochs: int):
    """One pass over this rank's share of the epoch: (loss sum, images seen, indices drawn, seconds)."""
    import torch
    on_cuda = info.device.type == "cuda"
    step.model.train()
    start = time.perf_counter()
    loss_sum, seen, drawn = 0.0, 0, []
    for number, batch in enumerate(progress(loader, desc=f"epoch {state['epoch']}/{epochs}", leave=False,
                                            unit="batch")):
        images = prepare_images(batch["image"], info.device, train=True, channels_last=True)
        with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=on_cuda):
            outputs = step.forward(step.train_model, images, batch)
        targets = {k: v.to(info.device, non_blocking=True) for k, v in batch.items() if k != "image"}
        loss = step.loss_fn(outputs.float(), targets)
        step.optimizer.zero_grad(set_to_none=True)
        (loss * step.loss_weight).backward()
        torch.nn.utils.clip_grad_norm_(step.model.parameters(), step.grad_clip)
        step.optimizer.step()
        step.scheduler.step()
        for callback in callbacks:
            callback("step", {**state, "step": number + 1})
        loss_sum += loss.item() * len(images)
        seen += len(images)
        drawn.append(batch["index"])
    if on_cuda:
        torch.cuda.synchronize()
    return loss_sum, seen, drawn, time.perf_counter() - start


def _history_row(epoch: int, loss_total: float, seen_total: float, seconds: float, val: dict, optimizer,
                 history: list[dict], info: DistInfo) -> dict:
    """history.csv's row of one epoch: loss, validation metrics, learning rate, speed, memory."""
    import torch
    row = {"epoch": epoch + 1, "train_loss": loss_total / max(seen_total, 1),
           **{f"val_{k}": v for k, v in val.items() if isinstance(v, (int, float))},
           "lr": optimizer.param_groups[0]["lr"], "images_per_s": seen_total / max(seconds, 1e-9),
           "samples_seen": int(seen_total) + (int(history[-1]["samples_seen"]) if history else 0),
           "seconds": seconds}
    if info.device.type == "cuda":  # the most this process has held so far, so a GPU run shows its headroom
        row["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated(info.device) / 2**30
    return row



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
            forward(model, prepare_images(batch["image"], info.device, train=False, channels_last=True), batch)
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
    """AdamW; timm's parameter groups keep weight decay off biases, norms, 1-D parameters (GeM's
    exponent) and whatever a timm model lists in no_weight_decay() (Swin's relative-position bias
    tables, position embeddings): decaying those pulls them towards zero for no regularising gain."""
    import torch
    from timm.optim import param_groups_weight_decay
    groups = param_groups_weight_decay(model, settings.weight_decay,
                                       no_weight_decay_list=no_weight_decay_names(model))
    return torch.optim.AdamW(groups, lr=settings.lr, fused=on_cuda)


def no_weight_decay_names(model) -> set[str]:
    """Full parameter names every submodule lists in its timm-style no_weight_decay(), so a timm
    backbone wrapped in our own module (the bone-age model) keeps its exclusions."""
    names = set()
    for prefix, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            names |= {f"{prefix}.{name}" if prefix else name for name in listed()}
    return names


def _warmup_cosine(optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup then cosine decay to 1% of the peak, stepped once per batch."""
    import torch

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress_ = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def code_fingerprint(forward: Callable) -> str:
    """A hash of the training code: the stage file that defines `forward`, and this module."""
    import hashlib
    digest = hashlib.sha256()
    for path in sorted({Path(forward.__code__.co_filename).resolve(), Path(__file__).resolve()}):
        digest.update(path.name.encode())
        digest.update(path.read_bytes() if path.is_file() else b"<missing>")
    return digest.hexdigest()[:16]


def dataset_fingerprint(dataset) -> str | None:
    """A hash of exactly what a CachedImageDataset trains on: its cached pixels and its values
    (targets, sex, ...). A relabelled image, an edited file or a new preprocessing changes it even
    when the split's ids do not. Reads the rows once (about a second per GB of cache)."""
    import hashlib
    if not isinstance(dataset, CachedImageDataset):
        return None
    digest = hashlib.sha256()
    for name in sorted(dataset.values):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(dataset.values[name]).tobytes())
    pixels = np.load(dataset.array_path, mmap_mode="r")
    for start in range(0, len(dataset.rows), 1024):
        digest.update(np.ascontiguousarray(pixels[dataset.rows[start:start + 1024]]).tobytes())
    return digest.hexdigest()[:16]


def _resume(run_dir: Path, meta: dict, model, optimizer, scheduler, early: EarlyStopping,
            history: list, info: DistInfo, force: bool = False):
    """Continue from last.pt when the same code, data and settings wrote it; otherwise start fresh.

    force (--force): start fresh and remove the previous run's last.pt/best.pt, except in a
    torchrun restart of this launch (TORCHELASTIC_RESTART_COUNT > 0), which resumes the epochs
    this launch already trained.
    """
    last = run_dir / "last.pt"
    start_epoch, best_state = 0, None
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if force and not restarted:
        barrier()  # every rank has seen the old files before rank 0 removes them
        if info.is_main:
            for name in ("last.pt", "best.pt"):
                (run_dir / name).unlink(missing_ok=True)
        log(f"{run_dir}: --force, training from scratch")
    elif last.is_file():
        state = load_checkpoint(last)
        old_meta = state.get("meta") or {}
        if old_meta == meta:
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
            changed = [what for what, keys in (("code", ["code"]), ("data", ["data", "splits"]))
                       if any(old_meta.get(k) != meta.get(k) for k in keys)]
            log(f"{last}: written by other {' and '.join(changed) or 'settings'}; training from scratch")
    agreed = broadcast_object(start_epoch)
    if agreed != start_epoch:
        raise InputError(f"{run_dir}: ranks disagree on where to resume ({agreed} vs {start_epoch}); "
                         "--out must be one folder shared by every node")
    return start_epoch, best_state


def _write_sample_audit(run_dir: Path, epoch: int, drawn: list, info: DistInfo, sampler: EpochSampler) -> None:
    """Record which dataset indices each rank trained on in one epoch (checked by the DDP tests)."""
    import torch
    local = torch.cat(drawn) if drawn else torch.empty(0, dtype=torch.long)
    # Shares may differ by a batch's remainder; all_gather needs equal shapes, so pad with -1.
    longest = int(max(all_reduce_sum([0.0] * info.rank + [len(local)] + [0.0] * (info.world_size - info.rank - 1),
                                     info.device)))
    padded = torch.full((longest,), -1, dtype=torch.long)
    padded[:len(local)] = local
    gathered = gather_rows(padded, info.device).numpy().reshape(info.world_size, -1)
    if info.is_main:
        write_json({"epoch": epoch + 1, "world_size": info.world_size, "balanced": sampler.balanced,
                    "batch_shares": sampler.batch_shares, "intended_samples": sampler.intended_samples,
                    "indices_by_rank": [[int(i) for i in row if i >= 0] for row in gathered]},
                   run_dir / "sample_audit.json")


def _primitives(values: dict) -> dict:
    return json.loads(json.dumps(values, default=_json_default))


# ------------------------------------------------------------------------------------------------
# 6. Distributed: setup/teardown, DDP-aware sampler, gathering predictions (03, 04, 05)
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
        # torchrun keeps one store across restarts (--max-restarts): without a fresh key space per
        # attempt, a restarted rank can read its peers' addresses from the attempt that crashed
        # and fail to connect (seen with gloo: "connectFullMesh failed ... Connection refused").
        store, _, _ = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend=backend, store=dist.PrefixStore(f"attempt{attempt}", store),
                                rank=rank, world_size=world_size, **kwargs)
    if device.type == "cpu":
        # torchrun's default of 1 thread per worker is right for N workers on N cores; a single
        # process may use them all.
        threads = os.environ.get("OMP_NUM_THREADS")
        torch.set_num_threads(int(threads) if threads else max(1, (os.cpu_count() or 1) // world_size))
    return DistInfo(rank, world_size, local_rank, device)


def cleanup_distributed() -> None:
    """barrier + destroy_process_group, then flush: without it gloo aborts at exit now and then.

    Called from a stage's `finally`. When an exception is on its way out of a multi-rank run, the
    barrier would wait for ranks that are busy in another collective until the timeout (30 min):
    instead this rank prints its error and leaves at once (`end_launch`), torchrun sees a failed
    worker and stops the others, and the whole launch ends within seconds.
    """
    import torch.distributed as dist
    error = sys.exc_info()[1]
    if error is not None and dist.is_available() and dist.is_initialized():
        end_launch(error)
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()


def end_launch(error: BaseException) -> None:
    """Print one rank's error (one line for an InputError, the traceback for a bug) and exit now.

    os._exit skips the interpreter's shutdown, which would wait in gloo/NCCL teardown for peers
    that never come. A clean SystemExit (code 0 or None) is not an error and exits normally.
    """
    import traceback
    if isinstance(error, SystemExit) and not isinstance(error, InputError) and error.code in (0, None):
        return
    rank, world_size = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    if isinstance(error, InputError):
        message = f"{error.code} [rank {rank} of {world_size}]"
    else:
        message = (f"[rank {rank} of {world_size}] "
                   + "".join(traceback.format_exception(type(error), error, error.__traceback__)).rstrip())
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    os._exit(1)


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
                 seed: int = 0, epoch_size: int | None = None, batch_shares: Sequence[int] | None = None):
        self.labels = np.asarray(labels, dtype=np.int64)
        self.balanced = balanced
        self.rank, self.world_size, self.seed = rank, world_size, seed
        total = epoch_size or len(self.labels)
        # batch_shares (from batch_plan): the epoch is a run of global batches of sum(shares) draws,
        # and rank r takes its contiguous share of each; shares may differ by one between ranks.
        self.batch_shares = list(batch_shares) if batch_shares is not None else None
        if self.batch_shares is not None:
            self.steps = total // sum(self.batch_shares)
            self.per_rank = self.steps * self.batch_shares[rank]
        else:
            self.per_rank = total // world_size
        self.epoch = 0
        if balanced and len(np.unique(self.labels)) < 2:
            raise ValueError("a balanced sampler needs both classes in the training set")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_indices(self) -> np.ndarray:
        """The whole epoch's draw (all ranks), identical on every rank."""
        rng = np.random.default_rng([self.seed, self.epoch])
        total = self.intended_samples
        if not self.balanced:
            return _cycled_permutation(np.arange(len(self.labels)), total, rng)
        classes = np.unique(self.labels)
        shares = [total // len(classes) + (1 if i < total % len(classes) else 0) for i in range(len(classes))]
        draws = [_cycled_permutation(np.flatnonzero(self.labels == c), n, rng) for c, n in zip(classes, shares)]
        return rng.permutation(np.concatenate(draws))

    @property
    def intended_samples(self) -> int:
        """Draws per epoch over all ranks."""
        if self.batch_shares is not None:
            return self.steps * sum(self.batch_shares)
        return self.per_rank * self.world_size

    def __iter__(self):
        draw = self.epoch_indices()
        if self.batch_shares is None:
            return iter(draw[self.rank::self.world_size].tolist())
        start = sum(self.batch_shares[:self.rank])
        batches = draw.reshape(self.steps, sum(self.batch_shares))
        return iter(batches[:, start:start + self.batch_shares[self.rank]].reshape(-1).tolist())

    def __len__(self) -> int:
        return self.per_rank


def batch_plan(n_draws: int, batch_size: int, world_size: int) -> tuple[list[int], int]:
    """Each rank's share of one global batch, and the steps per epoch, for `n_draws` per epoch.

    --batch-size is the GLOBAL batch, exact whatever the number of ranks: 32 on 3 ranks is
    11 + 11 + 10 (fit weights each rank's loss by its share, so the step equals one process's
    step on those 32 images). A training set smaller than one batch trains in one smaller step.
    """
    if world_size > n_draws:
        raise InputError(f"the training set has {n_draws} draws per epoch, fewer than the {world_size} "
                         "processes: every rank needs at least one image; launch fewer processes "
                         "(--nproc-per-node) or train on more images")
    if batch_size < world_size:
        raise InputError(f"--batch-size {batch_size} is smaller than the {world_size} processes; "
                         f"give a global batch of at least {world_size}")
    global_batch = min(batch_size, n_draws)
    shares = [global_batch // world_size + (1 if rank < global_batch % world_size else 0)
              for rank in range(world_size)]
    return shares, n_draws // global_batch


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
# 7. Metrics and plots: patient-bootstrap CIs, calibration, studies, figures (03, 04, 05, 07)
# ------------------------------------------------------------------------------------------------

def patient_resample_counts(groups, n_boot: int = 1000, seed: int = 0):
    """Yield [b, n_rows] arrays, b resamples at a time (n_boot in all): how many times each row
    appears in a resample of whole PATIENTS (groups) drawn with replacement.

    A patient's images are correlated (same bones, often the same fracture in AP and Lat);
    resampling images would treat them as independent and give too narrow an interval.
    Counts rather than row lists let every statistic be a weighted sum over all resamples at once
    (scipy.stats.bootstrap resamples observations, not clusters of them, so it cannot do this).
    Chunks keep memory near 16 MB whatever the number of images.
    """
    unique, inverse = np.unique(np.asarray(groups), return_inverse=True)
    n_patients = len(unique)
    rng = np.random.default_rng(seed)
    per_chunk = max(1, min(n_boot, 2_000_000 // max(1, len(inverse) + n_patients)))
    for start in range(0, n_boot, per_chunk):
        size = min(per_chunk, n_boot - start)
        chosen = rng.integers(0, n_patients, (size, n_patients)) + n_patients * np.arange(size)[:, None]
        counts = np.bincount(chosen.ravel(), minlength=size * n_patients).reshape(size, n_patients)
        yield counts[:, inverse].astype(np.float64)


def bootstrap_intervals(statistics: Callable[[np.ndarray], dict], groups, n_boot: int = 1000,
                        seed: int = 0, level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap intervals of every value `statistics(weights)` returns, resampling patients.

    `statistics` takes a [b, n_rows] array of row weights (see patient_resample_counts) and returns
    {name: b values}. Resamples where a statistic is undefined (NaN, e.g. AUC on one class) are left
    out of its interval; with fewer than half of them defined the interval is [nan, nan] rather
    than a guess.
    """
    collected: dict[str, list[np.ndarray]] = {}
    for weights in patient_resample_counts(groups, n_boot, seed):
        for name, values in statistics(weights).items():
            collected.setdefault(name, []).append(np.asarray(values, dtype=float))
    tail = (1 - level) / 2 * 100
    intervals = {}
    for name, chunks in collected.items():
        values = np.concatenate(chunks)
        values = values[np.isfinite(values)]
        intervals[name] = ([float(v) for v in np.percentile(values, [tail, 100 - tail])]
                           if len(values) >= max(1, n_boot // 2) else [float("nan"), float("nan")])
    return intervals


def estimates_with_ci(statistics: Callable[[np.ndarray], dict], n_rows: int, groups, n_boot: int = 1000,
                      seed: int = 0) -> dict:
    """{name: value on all rows, name_lo, name_hi: its patient-bootstrap 95% interval} for every
    value `statistics(weights)` returns (weights [b, n_rows]; all ones is the data as it is)."""
    point = {name: float(np.asarray(values)[0]) for name, values in statistics(np.ones((1, n_rows))).items()}
    intervals = bootstrap_intervals(statistics, groups, n_boot, seed) if n_rows else {}
    result = {}
    for name, value in point.items():
        low, high = intervals.get(name, [float("nan")] * 2)
        result.update({name: value, f"{name}_lo": low, f"{name}_hi": high})
    return result


def auc_with_ci(labels, probs, patients, n_boot: int = 1000, seed: int = 0) -> tuple[float, list[float]]:
    labels, probs = np.asarray(labels).astype(int), np.asarray(probs, dtype=float)
    if len(np.unique(labels)) < 2:
        return float("nan"), [float("nan"), float("nan")]
    result = estimates_with_ci(lambda weights: {"auc": _weighted_auc(weights, labels, probs)}, len(labels),
                               patients, n_boot, seed)
    return result["auc"], [result["auc_lo"], result["auc_hi"]]


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, NaN where the denominator is 0 (an undefined metric is never 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), np.nan)


def _weighted_auc(weights: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """ROC AUC of each weighted resample: the Mann-Whitney U with ties counted half, as
    sklearn's roc_auc_score gives on the resampled rows (tested). Rows are sorted by score once;
    per resample it is a cumulative sum of negative weight below each score level."""
    if len(probs) == 0:
        return np.full(len(weights), np.nan)
    order = np.argsort(probs, kind="stable")
    sorted_probs = probs[order]
    starts = np.flatnonzero(np.r_[True, sorted_probs[1:] != sorted_probs[:-1]])  # one per score level
    positive = labels[order].astype(float)
    ordered = weights[:, order]
    pos = np.add.reduceat(ordered * positive, starts, axis=1)
    neg = np.add.reduceat(ordered * (1 - positive), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    return _ratio((pos * (below + 0.5 * neg)).sum(axis=1), pos.sum(axis=1) * neg.sum(axis=1))


def _decision_metrics(weights: np.ndarray, labels: np.ndarray, probs: np.ndarray, decisions: np.ndarray,
                      prevalence: float | None) -> dict:
    """The binary metrics of each weighted resample (weights [b, n_rows]) from weighted counts."""
    positive, decided = labels == 1, decisions.astype(bool)
    tp, fp = weights @ (decided & positive), weights @ (decided & ~positive)
    fn, tn = weights @ (~decided & positive), weights @ (~decided & ~positive)
    sens, spec = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    values = {"auc": _weighted_auc(weights, labels, probs), "sensitivity": sens, "specificity": spec,
              "ppv": _ratio(tp, tp + fp), "npv": _ratio(tn, tn + fn), "f1": _ratio(2 * tp, 2 * tp + fp + fn),
              "accuracy": _ratio(tp + tn, tp + fp + fn + tn)}
    if prevalence is not None:
        values.update(_bayes_predictive_values(sens, spec, prevalence))
    return values


def _bayes_predictive_values(sensitivity, specificity, prevalence: float) -> dict:
    """PPV and NPV a hospital would see at `prevalence` (Bayes' rule from sensitivity and
    specificity): the test set is balanced by design, so its own PPV/NPV overstate PPV."""
    true_pos, false_pos = sensitivity * prevalence, (1 - specificity) * (1 - prevalence)
    true_neg, false_neg = specificity * (1 - prevalence), (1 - sensitivity) * prevalence
    return {"ppv_at_prevalence": _ratio(true_pos, true_pos + false_pos),
            "npv_at_prevalence": _ratio(true_neg, true_neg + false_neg)}


def binary_metrics_with_ci(labels, probs, patients, threshold, n_boot: int = 1000, seed: int = 0,
                           prevalence: float | None = None, decisions=None) -> dict:
    """AUC, sensitivity, specificity, PPV, NPV, F1 and accuracy at `threshold`, each with its
    patient-bootstrap 95% interval (`<name>_lo`, `<name>_hi`).

    `decisions` (0/1 per row) replaces `probs >= threshold` when each row has its own threshold
    (a cascade routes each image to a model with its own). With `prevalence`, also the PPV/NPV
    expected at that prevalence. Undefined values (one class only) are NaN, never 0.
    """
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=float)
    decisions = (probs >= threshold) if decisions is None else np.asarray(decisions).astype(bool)
    result = {"n": int(len(labels)), "n_pos": int(labels.sum()),
              "threshold": float(threshold) if threshold is not None else float("nan"),
              **estimates_with_ci(lambda weights: _decision_metrics(weights, labels, probs, decisions, prevalence),
                                  len(labels), patients, n_boot, seed)}
    if prevalence is not None:
        result["prevalence"] = float(prevalence)
    return result


def study_table(images: pd.DataFrame, prob_column: str, decision_column: str, **aggregations) -> pd.DataFrame:
    """THE study rule, used by 04's evaluation and by 07: one row per study.

    A study is (patient_id, study_id, laterality): a child's left and right wrists on one day are
    two studies, not one. Its score is its most suspicious image (max probability), and it is
    positive when ANY image is positive at its own model's threshold (AP and Lat models have
    different thresholds; a fracture seen in one projection is a fracture of the study).
    Extra `aggregations` (pandas named aggregations) add columns, e.g. the study's projections.
    """
    keys = ["patient_id", "study_id", "laterality"]
    frame = images.copy()
    for key in keys:
        frame[key] = frame[key].fillna("").astype(str) if key in frame else ""
    aggregations = {"n_images": (prob_column, "size"), "prob": (prob_column, "max"),
                    "decision": (decision_column, "max"), **aggregations}
    if "label" in frame:
        aggregations["label"] = ("label", "max")
    studies = frame.groupby(keys, sort=True, as_index=False).agg(**aggregations)
    studies["decision"] = studies["decision"].astype(int)
    return studies


def apply_calibration(probs, calibration: dict | None) -> np.ndarray:
    """Raw probabilities -> calibrated ones with a map from fit_calibration (None: unchanged)."""
    probs = np.asarray(probs, dtype=float)
    if not calibration or calibration.get("method") == "identity":
        return probs
    from scipy.special import expit
    return expit(calibration["slope"] * clipped_logit(probs) + calibration["intercept"])


def clipped_logit(probs) -> np.ndarray:
    """The logit of probabilities clipped to [1e-7, 1 - 1e-7]: a float32 sigmoid saturates at
    exactly 0 or 1, whose logit is infinite."""
    from scipy.special import logit
    return logit(np.clip(np.asarray(probs, dtype=float), 1e-7, 1 - 1e-7))


def calibration_metrics(labels, probs, n_bins: int = 10, prevalence: float | None = None) -> dict:
    """Brier score and expected calibration error (ECE: |observed - predicted| averaged over
    10 equal-width probability bins, weighted by how many predictions fall in each).

    With `prevalence`, each class is reweighted so fractures make up that share: the scores a
    population with that prevalence would give. A balanced test set otherwise penalises
    probabilities that are right for the source data.
    """
    from sklearn.metrics import brier_score_loss
    labels, probs = np.asarray(labels).astype(int), np.asarray(probs, dtype=float)
    if len(labels) == 0 or (prevalence is not None and len(np.unique(labels)) < 2):
        return {"brier": float("nan"), "ece": float("nan")}
    weights = np.ones(len(labels))
    if prevalence is not None:
        share = labels.mean()
        weights = np.where(labels == 1, prevalence / share, (1 - prevalence) / (1 - share))
    bins = np.minimum((probs * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        inside = bins == b
        if inside.any():
            observed = np.average(labels[inside], weights=weights[inside])
            ece += abs(observed - np.average(probs[inside], weights=weights[inside])) * weights[inside].sum()
    return {"brier": float(brier_score_loss(labels, probs, sample_weight=weights)), "ece": float(ece / weights.sum())}


def regression_metrics_with_ci(true, predicted, groups, n_boot: int = 1000, seed: int = 0) -> dict:
    """MAE, RMSE, R^2 and mean bias (predicted - true), each with its bootstrap 95% interval."""
    n_rows = len(np.asarray(true))
    return {"n": n_rows, **estimates_with_ci(_regression_statistics(true, predicted), n_rows, groups, n_boot, seed)}


def _regression_statistics(true, predicted) -> Callable[[np.ndarray], dict]:
    """weights [b, n_rows] -> the regression metrics of each weighted resample."""
    true, predicted = np.asarray(true, dtype=float), np.asarray(predicted, dtype=float)

    def statistics(weights):
        error, total = predicted - true, weights.sum(axis=1)
        squared = weights @ error ** 2
        centred = true - true.mean()  # sum of w (true - weighted mean)^2, without cancellation
        spread = weights @ centred ** 2 - _ratio((weights @ centred) ** 2, total)
        return {"mae": _ratio(weights @ np.abs(error), total), "rmse": np.sqrt(_ratio(squared, total)),
                "r2": 1 - _ratio(squared, np.where(spread > 1e-9 * total, spread, 0)),
                "bias": _ratio(weights @ error, total)}

    return statistics


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
    from sklearn.metrics import RocCurveDisplay
    plt = _figure()
    labels, probs = np.asarray(labels).astype(int), np.asarray(probs, dtype=float)
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    if len(np.unique(labels)) == 2:
        RocCurveDisplay.from_predictions(labels, probs, ax=ax, name="images", plot_chance_level=True)
        if threshold is not None:
            called = probs >= threshold
            ax.plot([called[labels == 0].mean()], [called[labels == 1].mean()], "o", color="black",
                    label=f"threshold {threshold:.2f}")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    return save_figure(fig, path)


def plot_pr(labels, probs, path: Path, title: str, threshold: float | None = None) -> Path:
    """Precision-recall curve, shown beside each ROC: with few negatives or few positives it
    shows what the ROC hides (how many flagged images are really fractures)."""
    from sklearn.metrics import PrecisionRecallDisplay
    plt = _figure()
    labels, probs = np.asarray(labels).astype(int), np.asarray(probs, dtype=float)
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    if len(np.unique(labels)) == 2:
        PrecisionRecallDisplay.from_predictions(labels, probs, ax=ax, name="images", plot_chance_level=True)
        if threshold is not None and (probs >= threshold).any():
            flagged = probs >= threshold
            ax.plot([flagged[labels == 1].mean()], [labels[flagged].mean()], "o", color="black",
                    label=f"threshold {threshold:.2f}")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower left")
    return save_figure(fig, path)


def plot_reliability(curves: dict, path: Path, title: str, n_bins: int = 10) -> Path:
    """Reliability diagram: observed fracture rate against mean predicted probability per bin,
    one line per {name: (labels, probs)}; the diagonal is perfect calibration."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    for name, (labels, probs) in curves.items():
        labels, probs = np.asarray(labels).astype(int), np.asarray(probs, dtype=float)
        bins = np.minimum((probs * n_bins).astype(int), n_bins - 1)
        used = [b for b in range(n_bins) if np.any(bins == b)]
        scores = calibration_metrics(labels, probs, n_bins)
        ax.plot([probs[bins == b].mean() for b in used], [labels[bins == b].mean() for b in used],
                "o-", label=f"{name} (Brier {scores['brier']:.3f}, ECE {scores['ece']:.3f})")
    ax.set(xlabel="mean predicted probability", ylabel="observed fracture rate", title=title,
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)


def plot_training_curves(history_csv: Path, path: Path, title: str, metric: str) -> Path:
    """Training loss and the validation metric per epoch, from fit()'s history.csv."""
    plt = _figure()
    history = pd.read_csv(history_csv)
    fig, loss_axis = plt.subplots(figsize=(5, 3.4))
    loss_axis.plot(history["epoch"], history["train_loss"], "o-", color="tab:blue", label="train loss")
    loss_axis.set(xlabel="epoch", ylabel="train loss", title=title)
    metric_axis = loss_axis.twinx()
    metric_axis.plot(history["epoch"], history[f"val_{metric}"], "s-", color="tab:orange",
                     label=f"val {metric}")
    metric_axis.set_ylabel(f"validation {metric}")
    lines = loss_axis.get_lines() + metric_axis.get_lines()
    loss_axis.legend(lines, [line.get_label() for line in lines], loc="best", fontsize=8)
    return save_figure(fig, path)


def plot_confusion(matrix, class_names: Sequence[str], path: Path, title: str) -> Path:
    from sklearn.metrics import ConfusionMatrixDisplay
    plt = _figure()
    size = max(3.2, 0.9 * len(class_names) + 1.5)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(class_names)).plot(
        ax=ax, cmap="Blues", colorbar=False, xticks_rotation=30)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------------
# 8. Experiment tracking: MLflow, optional with --mlflow (03, 04, 05)
# ------------------------------------------------------------------------------------------------

def start_mlflow(args: argparse.Namespace, experiment: str, run_name: str | None = None):
    """Start an MLflow run on rank 0 and log the resolved config as parameters; returns the
    mlflow module (None on other ranks). Tracking goes to args.mlflow_uri, by default a SQLite
    store under OUT/mlruns with its artifacts beside it, so nothing leaves --out."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    try:
        import mlflow
    except ImportError:
        raise InputError("--mlflow: mlflow is not installed; `pip install -r requirements.txt` "
                         "(it pins mlflow-skinny, SQLAlchemy and alembic)") from None
    folder = Path(args.out).resolve() / "mlruns"
    uri = getattr(args, "mlflow_uri", None) or f"sqlite:///{folder / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        folder.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    # Without an explicit artifact location MLflow writes artifacts to ./mlruns of the CURRENT
    # directory: outside --out.
    if mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment, artifact_location=(folder / "artifacts" / experiment).as_uri())
    mlflow.set_experiment(experiment)
    mlflow.start_run(run_name=run_name)
    params = {k: v for k, v in config_dict(args).items() if v is not None}
    mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
    return mlflow


def log_mlflow_run(mlflow, *, history_csv: Path | None = None, metrics: dict | None = None,
                   files: Sequence[Path] = (), prefix: str = "", artifact_path: str | None = None) -> None:
    """Per-epoch metrics from history.csv (step = epoch), final metrics, and files (plots, the
    model); non-finite values are left out, since MLflow rejects NaN."""
    if mlflow is None:
        return
    if history_csv is not None and Path(history_csv).is_file():
        for row in pd.read_csv(history_csv).to_dict("records"):
            mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in row.items()
                                if k != "epoch" and isinstance(v, (int, float)) and np.isfinite(v)},
                               step=int(row["epoch"]))
    if metrics:
        mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in metrics.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)})
    for file in files:
        if Path(file).is_file():
            mlflow.log_artifact(str(file), artifact_path=artifact_path)


# ------------------------------------------------------------------------------------------------
# 9. A run's fracture models and Grad-CAM++ overlays (06, 07)
# ------------------------------------------------------------------------------------------------

MAX_OVERLAY_SIDE = 1024  # full-size radiographs would make 10 MB PNGs


def fracture_models(fracture_dir: Path) -> dict[tuple[str, int], dict]:
    """{(projection, age group): what 06 and 07 deploy for it}, AP before Lat, groups in order:
    04's deployed.json (the arm chosen on validation: `paths`, the model files whose fracture
    probabilities are averaged, with its `threshold` on their raw mean and its `calibration`
    map), or, in a run from before 04 chose arms, the group's best.pt alone with the threshold
    and map its checkpoint holds. A group 04 skipped has neither."""
    found = {}
    for projection in PROJECTIONS:
        groups = sorted(int(folder.name.removeprefix("group"))
                        for folder in (Path(fracture_dir) / projection).glob("group*")
                        if folder.name.removeprefix("group").isdigit())
        for group in groups:
            folder = Path(fracture_dir) / projection / f"group{group}"
            if (folder / "deployed.json").is_file():
                record = read_json(folder / "deployed.json")
                found[(projection, group)] = {**record, "paths": [Path(fracture_dir) / m for m in record["models"]]}
            elif (folder / "best.pt").is_file():
                checkpoint = load_checkpoint(folder / "best.pt")
                found[(projection, group)] = {"arm": "group model", "paths": [folder / "best.pt"],
                                              "threshold": float(checkpoint.get("threshold", 0.5)),
                                              "calibration": checkpoint.get("calibration")}
    return found


def deployed_grad_cam(models: list, squares: np.ndarray, device, ages=None) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM++ of a group's deployed models ((model, checkpoint) pairs, 1 or 2 of them), the
    maps and probabilities averaged as 04 averages a deployed mean's probabilities. `ages` (years,
    one per image) feed an age-conditioned model, as they fed its probabilities."""
    maps = [grad_cam_plus_plus(model, squares, device, ages if getattr(model, "side_input", None) else None)
            for model, _ in models]
    return np.mean([cams for cams, _ in maps], axis=0), np.mean([probs for _, probs in maps], axis=0)


def grad_cam_plus_plus(model, squares: np.ndarray, device, side_values=None) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM++ maps of the fracture logit, [B, S, S] in [0, 1], and the fracture probabilities.

    `squares` are uint8 [B, S, S] from preprocess_image. The model has ONE logit; the
    target is BinaryClassifierOutputTarget(1), i.e. the logit itself (evidence FOR a fracture),
    for every image whatever its prediction: a false negative then shows what little fracture
    evidence the model found, a false positive what misled it. (ClassifierOutputTarget(0) picks the
    same logit; ClassifierOutputTarget(1) would index past the single output, and the default
    argmax target is meaningless for one logit.) fp32 without autocast: Grad-CAM++ weights use
    gradients cubed, which underflow in bf16. `side_values`: the second input of a side-input
    model (04's age-conditioned one), held fixed while Grad-CAM calls the model on images alone.
    """
    import torch
    from pytorch_grad_cam import GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget
    model = model.float().eval()
    images = prepare_images(torch.from_numpy(np.ascontiguousarray(squares)).unsqueeze(1),
                                   device, train=False, channels_last=False)
    explained = model if side_values is None else _with_side_input(model, side_values, device)
    cam = GradCAMPlusPlus(explained, target_layers_for(model), reshape_transform=reshape_transform_for(model))
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


def _with_side_input(model, side_values, device):
    """`model` as a function of the images alone, its side input fixed to `side_values`."""
    torch, nn, _ = _torch_modules()
    values = torch.as_tensor(np.asarray(side_values, dtype=np.float32), device=device)

    class WithSideInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, images):
            return self.model(images, values).unsqueeze(1)  # [B, 1], as a one-logit classifier

    return WithSideInput()


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
    A side-input model (build_side_input_model): its `features`, the last map, channels first.
    """
    if hasattr(model, "side_input"):
        return [model.features]
    family = _family(model)
    if family == "convnext":
        return [model.stages[-1]]
    if family == "swin":
        return [model.layers[-1]]
    return [model.layer4[-1]]


def reshape_transform_for(model):
    """None for channels-first families; `to_channels_first` for Swin's channels-last stages."""
    return to_channels_first if not hasattr(model, "side_input") and _family(model) == "swin" else None


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
# 10. Command line, start-up, errors and file helpers (every stage, run_all)
# ------------------------------------------------------------------------------------------------

def import_torch() -> None:
    """Import torch, torchvision and timm for this process with the cyclic garbage collector
    paused, then freeze what they built out of its reach. A stage calls it before it first uses torch.

    The three create millions of long-lived objects, which CPython's collector would traverse
    again and again while they load and once more at exit. Measured on 2 cores: `import timm` plus
    exit took 8.2-10.5 s plainly and 5.3-6.1 s this way, in every process a stage or torchrun
    worker starts. gc.freeze() is CPython's own tool for objects made at start-up that live to the
    end; nothing in the libraries does this for us.
    """
    import gc
    if "timm" in sys.modules:
        return  # imported already (a test calling main() in its own process): nothing to freeze
    gc.disable()
    try:
        import timm  # noqa: F401 -- and with it torch and torchvision
    finally:
        gc.enable()
        gc.freeze()


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
    """Fill the data and preset defaults: the demo preset goes with the demo data.

    The wrist and bone-age tasks are independent datasets, so they are independent tracks:
    neither --data nor --boneage-data gives the demo of both; either one alone runs that track
    only, and the other stays None (its stages are skipped, never pointed at the demo).
    """
    on_demo = args.data is None and args.boneage_data is None
    if on_demo:
        args.data, args.boneage_data = DEMO_WRIST_ROOT, DEMO_BONEAGE_ROOT
    args.data = Path(args.data) if args.data is not None else None
    args.boneage_data = Path(args.boneage_data) if args.boneage_data is not None else None
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
    group.add_argument("--force", action="store_true",
                       help="train from scratch even if a last.pt of the same code, data and settings "
                            "exists (a torchrun restart of the same launch still resumes)")
    group.add_argument("--mlflow", action="store_true", help="log params, per-epoch and final metrics, "
                                                              "plots and the model to MLflow")
    group.add_argument("--mlflow-uri", help="MLflow tracking URI (default: sqlite under OUT/mlruns/)")
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
        import_torch()  # the stage's first use of torch
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


def write_run_config(folder: Path, args: argparse.Namespace, *, hide: Callable[[str], str] | None = None,
                     **extra) -> Path:
    """Record how a stage was run beside its outputs: command line, resolved flags, versions.

    `hide` rewrites the command and the values (07 passes hide_uids: its inputs may be named by
    DICOM UIDs); the library versions are added after it, so a version string is never touched.
    """
    record = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "config": config_dict(args), **extra}
    if hide is not None:
        record = json.loads(hide(json.dumps(record)))
    return write_json({**record, "versions": library_versions()}, Path(folder) / "config.json")


def seed_everything(seed: int) -> None:
    import torch
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
