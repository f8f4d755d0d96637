"""Draw the fixed, patient-exclusive test sets for the wrist and bone-age models, once.

Reads
  --data           GRAZPEDWRI-DX folder: dataset.csv and the images (images_part1..4/ or images/)
  --boneage-data   RSNA bone-age folder or CSV (id,boneage,male and <id>.png under its folder)

Writes, under --out/splits/
  wrist_test.csv            the wrist test images: every dataset.csv column plus image_path, label
                            (1 = fracture_visible), projection_name, age_group and age_bin
  wrist_quarantine.csv      the test patients' other images, same columns: in no split at all
  boneage_test.csv          id, boneage (months), male, sex, image_path, age_bin
  age_groups.json           the age-group edges and names that every later stage uses
  test_report.json          the fill of every test cell, shortfalls, exclusions by reason, the
                            quarantine count, seed, --per-cell and the filters (02 reuses them)
  01_split_test/config.json how this stage was run

Wrist test set: for each projection (AP, Lat), 20 one-year age bins [0,1) .. [19,20) x 2 classes
(fracture visible or not) x --per-cell images. It is patient-exclusive: whole patients are drawn,
and a test patient's other images (either projection, any study) are quarantined, so no model is
ever trained on a child it is later tested on. Patients are drawn at random (seeded) for the
scarcest cells first, and a drawn patient's images fill every cell that still has room, so few
patients are needed. A cell without enough patients is filled as far as possible and its
shortfall is printed and recorded. Images aged 20 or more are never in the test set.

Bone-age test set: --boneage-test-fraction of the images, drawn per stratum of one-year bone-age
bin x sex. A stratum of n >= 2 images gives max(1, round(fraction * n)) images, so rare ages are
tested too; a stratum of a single image stays in training. Or --boneage-test-csv: your own labelled
test CSV (e.g. RSNA's validation set), whose images lie under that CSV's folder.

The same --seed draws the same test sets, byte for byte. The two datasets are independent
tracks: give --data alone (wrist files only), --boneage-data alone (boneage_test.csv only), or
both; neither runs the demo of both. Then 02_split_trainval.py splits the rest into train and val.
A file stem found twice under a data folder resolves to the first path in sorted order (the same
on every copy of the data) and is counted in test_report.json.

Run:
  python 01_split_test.py                       # the demo data, --per-cell 4
  python 01_split_test.py --data /data/GRAZPEDWRI-DX --boneage-data /data/rsna-bone-age
  python 01_split_test.py --data /data/GRAZPEDWRI-DX      # the wrist track alone
  python 01_split_test.py --boneage-data /data/rsna-bone-age   # the bone-age track alone
  python 01_split_test.py --data /data/GRAZPEDWRI-DX --boneage-data /data/rsna-bone-age \\
      --boneage-test-csv /data/rsna-bone-age/boneage-validation-dataset.csv --exclude-cast
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

import common

PER_CELL = {"demo": 4, "full": 10}
TEST_AGE_BINS = 20  # one-year bins [0,1) .. [19,20): GRAZPEDWRI-DX ages run 0.2-19 years
TEST_PROJECTIONS = ("AP", "Lat")


def parse_args(argv=None):
    parser = common.make_parser(__doc__)
    parser.add_argument("--per-cell", type=int, default=None, metavar="N",
                        help="test images per (projection, one-year age bin, class) cell "
                             "(default: 10 with --preset full, 4 with --preset demo)")
    parser.add_argument("--age-edges", default="5,10,15",
                        help="age-group edges in years, written for every later stage; "
                             "groups are half-open, [0,5) [5,10) [10,15) [15,inf) (default: 5,10,15)")
    parser.add_argument("--exclude-cast", action="store_true",
                        help="drop images taken through a cast (default: keep them)")
    parser.add_argument("--include-metal", action="store_true",
                        help="keep images with metal implants (default: dropped, as in the study)")
    parser.add_argument("--ao-filter", metavar="REGEX", default=None,
                        help="keep only fractures whose AO code matches, e.g. '^23r' for the distal "
                             "radius; images without an AO code stay as negatives (default: all)")
    parser.add_argument("--boneage-test-fraction", type=float, default=0.10,
                        help="share of the bone-age images drawn for the test set (default: 0.10)")
    parser.add_argument("--boneage-test-csv", type=Path, default=None, metavar="PATH",
                        help="use this labelled RSNA-style CSV as the bone-age test set instead of "
                             "drawing one; its images must lie under its folder (default: draw)")
    args = common.resolve_common_args(parser.parse_args(argv))
    args.age_edges = list(parse_age_edges(args.age_edges))
    if args.per_cell is None:
        args.per_cell = PER_CELL[args.preset]
    if args.per_cell < 1:
        raise common.InputError(f"--per-cell {args.per_cell}: give at least 1 image per cell")
    if not 0 < args.boneage_test_fraction < 1:
        raise common.InputError(f"--boneage-test-fraction {args.boneage_test_fraction}: give a "
                                "share between 0 and 1, e.g. 0.1")
    if args.ao_filter:
        try:
            re.compile(args.ao_filter)
        except re.error as error:
            raise common.InputError(f"--ao-filter {args.ao_filter!r}: not a regular expression "
                                    f"({error}); e.g. '^23r'") from None
    return args


def parse_age_edges(text: str | Sequence[float]) -> tuple[float, ...]:
    """'5,10,15' -> (5.0, 10.0, 15.0); strictly increasing and positive."""
    values = [float(v) for v in (text.split(",") if isinstance(text, str) else text)]
    if not values or any(b <= a for a, b in zip(values, values[1:])) or values[0] <= 0:
        raise common.InputError(f"--age-edges {text!r}: give strictly increasing positive years, e.g. 5,10,15")
    return tuple(values)


def main(argv=None):
    args = parse_args(argv)
    splits_dir = common.ensure_writable_dir(args.out / "splits")
    # The two tasks are independent datasets: each part runs when its data is given.
    wrist_report = split_wrist(args) if args.data is not None else None
    boneage_report = split_boneage(args) if args.boneage_data is not None or args.boneage_test_csv else None
    report = {
        "seed": args.seed, "per_cell": args.per_cell, "age_edges": args.age_edges,
        "data": str(args.data.resolve()) if args.data is not None else None,
        "boneage_data": str(args.boneage_data.resolve()) if args.boneage_data is not None else None,
        "filters": {"exclude_metal": not args.include_metal, "exclude_cast": args.exclude_cast,
                    "ao_pattern": args.ao_filter},
        "wrist": wrist_report, "boneage": boneage_report,
    }
    common.write_json(report, splits_dir / "test_report.json")
    common.write_run_config(splits_dir / "01_split_test", args)
    written = (["wrist_test.csv", "wrist_quarantine.csv", "age_groups.json"] if wrist_report else []) \
        + (["boneage_test.csv"] if boneage_report else [])
    common.log(f"wrote {splits_dir}: {', '.join(written + ['test_report.json'])}")


def split_wrist(args) -> dict:
    """Draw and write the wrist test set and quarantine; return the wrist part of the report."""
    # The wrist metadata, filtered as the study did; 02 reads the same rows with these filters.
    filters = {"exclude_metal": not args.include_metal, "exclude_cast": args.exclude_cast,
               "ao_pattern": args.ao_filter}
    index = common.index_images(args.data) if args.data.is_dir() else None
    wrist, excluded = common.read_wrist_metadata(args.data, image_index=index, **filters)
    total_rows = len(wrist) + sum(excluded.values())
    common.log(f"wrist: {len(wrist)} images of {wrist['patient_id'].nunique()} patients kept; "
               f"{common.format_exclusions(excluded, total_rows)}")
    if index is not None and index.duplicates:
        common.log(f"wrist: {index.duplicate_line(args.data)}")
    wrist = common.sort_wrist(common.add_age_columns(wrist, args.age_edges))

    # The test set, drawn by whole patients. Every other image of a test patient is quarantined:
    # a model that saw the same child's other radiographs (the same bones, the same fracture a week
    # later) could recognise the patient instead of the fracture, and every test metric would lie.
    in_test, cells = draw_wrist_test(wrist, args.per_cell, args.seed)
    test = wrist[in_test]
    quarantine = wrist[~in_test & wrist["patient_id"].isin(test["patient_id"])]
    per_projection = test["projection_name"].value_counts().reindex(TEST_PROJECTIONS, fill_value=0)
    common.log(f"wrist test: {len(test)} images of {test['patient_id'].nunique()} patients "
               f"({', '.join(f'{name} {n}' for name, n in per_projection.items())}; "
               f"{args.per_cell} per cell wanted, {len(cells)} cells)")
    common.log(f"wrist quarantine: {len(quarantine)} other images of the test patients, "
               "kept out of train and val")
    common.log(format_shortfalls(cells, args.per_cell))
    common.write_csv(test, common.split_path(args.out, "wrist", "test"))
    common.write_csv(quarantine, common.split_path(args.out, "wrist", "quarantine"))
    common.write_json({"edges": args.age_edges, "names": common.age_group_names(args.age_edges)},
                      common.age_groups_path(args.out))
    return {"rows": total_rows, "kept": len(wrist), "excluded": excluded,
            "duplicate_stems": _duplicates(index),
            "test_images": {name: int(n) for name, n in per_projection.items()},
            "test_patients": int(test["patient_id"].nunique()),
            "quarantine_images": len(quarantine),
            "shortfall_images": int(cells["shortfall"].sum()),
            "cells": cells.to_dict(orient="records"),
            "shortfalls": cells[cells["shortfall"] > 0].to_dict(orient="records")}


def split_boneage(args) -> dict:
    """Draw (or take the user's) bone-age test set and write it; return its part of the report."""
    if args.boneage_test_csv is not None:
        source_csv = args.boneage_test_csv
    else:
        source_csv = common.find_boneage_csv(args.boneage_data)
    index = common.index_images(source_csv.parent)
    boneage, excluded = common.read_boneage_metadata(source_csv, image_index=index)
    if index is not None and index.duplicates:
        common.log(f"bone age: {index.duplicate_line(source_csv.parent)}")
    boneage = common.add_boneage_bin(boneage)
    if args.boneage_test_csv is not None:
        boneage_test, source = boneage, str(args.boneage_test_csv.resolve())
    else:
        boneage_test = boneage[draw_boneage_test(boneage, args.boneage_test_fraction, args.seed)]
        source = "stratified draw"
    boneage_test = boneage_test.sort_values(["age_bin", "sex", "id"])
    common.log(f"bone-age test: {len(boneage_test)} of {len(boneage)} images ({source})")
    common.write_csv(boneage_test, common.split_path(args.out, "boneage", "test"))
    return {"source": source, "test_images": len(boneage_test), "of_images": len(boneage),
            "fraction": args.boneage_test_fraction, "excluded": excluded,
            "duplicate_stems": _duplicates(index)}


def _duplicates(index) -> dict:
    """Stems found more than once: counted in the report with a few examples (a hospital table
    names each image by its path, so it has no index and no duplicate stems)."""
    if index is None:
        return {"stems": 0, "ignored_files": 0, "examples": {}}
    examples = {stem: [str(index[stem]), *map(str, others)]
                for stem, others in sorted(index.duplicates.items())[:5]}
    return {"stems": len(index.duplicates), "ignored_files": sum(map(len, index.duplicates.values())),
            "examples": examples}


def draw_wrist_test(wrist: pd.DataFrame, per_cell: int, seed: int) -> tuple[np.ndarray, pd.DataFrame]:
    """Choose whole patients until every (projection, age_bin, label) cell holds per_cell images.

    Returns a boolean mask over `wrist` (True = test) and one row per cell with its fill.
    Deterministic for a seed whatever the CSV's row order: rows and patients are sorted before the
    seeded shuffles, and every loop runs over lists, never over sets.
    """
    rng = np.random.default_rng(seed)
    candidates = wrist[wrist["age_bin"].between(0, TEST_AGE_BINS - 1)].sort_values("filestem")
    # Shuffled images decide which of a patient's images fill a cell with less room than they have.
    candidates = candidates.iloc[rng.permutation(len(candidates))]
    patients = np.sort(candidates["patient_id"].unique())
    patient_rank = dict(zip(patients, rng.permutation(len(patients))))

    images_of_patient: dict[str, list[tuple[int, tuple]]] = {}
    patients_of_cell: dict[tuple, list[str]] = {}
    for row, patient, projection, age_bin, label in zip(
            candidates.index, candidates["patient_id"], candidates["projection_name"],
            candidates["age_bin"], candidates["label"]):
        cell = (projection, int(age_bin), int(label))
        images_of_patient.setdefault(patient, []).append((row, cell))
        patients_of_cell.setdefault(cell, []).append(patient)
    for cell, members in patients_of_cell.items():
        patients_of_cell[cell] = sorted(set(members), key=patient_rank.get)

    all_cells = [(projection, age_bin, label) for projection in TEST_PROJECTIONS
                 for age_bin in range(TEST_AGE_BINS) for label in (0, 1)]
    room = dict.fromkeys(all_cells, per_cell)
    # Scarcest cells first: their patients must be taken anyway, and the images those patients
    # bring to common cells fill them for free. The other way round, a scarce cell's patients
    # would arrive after the common cells were full, and their other images would be quarantined.
    chosen: set[str] = set()
    test_rows: list[int] = []
    for cell in sorted(all_cells, key=lambda c: (len(patients_of_cell.get(c, [])), c)):
        for patient in patients_of_cell.get(cell, []):
            if room[cell] == 0:
                break
            if patient in chosen:
                continue
            chosen.add(patient)
            for row, image_cell in images_of_patient[patient]:
                if room[image_cell] > 0:
                    room[image_cell] -= 1
                    test_rows.append(row)

    cells = pd.DataFrame(all_cells, columns=["projection", "age_bin", "label"])
    cells["patients_available"] = [len(patients_of_cell.get(c, [])) for c in all_cells]
    cells["wanted"] = per_cell
    cells["filled"] = [per_cell - room[c] for c in all_cells]
    cells["shortfall"] = cells["wanted"] - cells["filled"]
    return wrist.index.isin(test_rows), cells


def format_shortfalls(cells: pd.DataFrame, per_cell: int) -> str:
    """A table of the age bins with an unfilled cell: images filled per projection and class."""
    short = cells[cells["age_bin"].isin(cells.loc[cells["shortfall"] > 0, "age_bin"])]
    if short.empty:
        return f"every test cell holds {per_cell} images"
    table = short.pivot(index="age_bin", columns=["projection", "label"], values="filled")
    table.columns = [f"{projection} {'fracture' if label else 'normal'}"
                     for projection, label in table.columns]
    table.index = [f"[{age_bin},{age_bin + 1})" for age_bin in table.index]
    return (f"test cells short of {per_cell} images ({int(cells['shortfall'].sum())} images missing "
            f"in all); images filled per cell:\n{table.to_string()}")


def draw_boneage_test(boneage: pd.DataFrame, fraction: float, seed: int) -> np.ndarray:
    """A seeded draw of `fraction` of each (age_bin, sex) stratum; at least one where n >= 2."""
    rng = np.random.default_rng(seed)
    ordered = boneage.sort_values(["age_bin", "sex", "id"])
    test_rows: list[int] = []
    for _, stratum in ordered.groupby(["age_bin", "sex"], sort=True):
        if len(stratum) >= 2:
            n_test = max(1, round(fraction * len(stratum)))
            test_rows.extend(rng.choice(stratum.index.to_numpy(), n_test, replace=False))
    return boneage.index.isin(test_rows)


if __name__ == "__main__":
    main()
