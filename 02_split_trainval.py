"""Split everything outside the test sets into train and val, by patient, and prove nothing leaks.

Reads, under --out/splits/ (written by 01_split_test.py):
  wrist_test.csv, wrist_quarantine.csv, boneage_test.csv, age_groups.json, test_report.json
and the metadata again, from the folders 01 read and with 01's filters (both recorded in
test_report.json, so no flag needs repeating; a --data or --boneage-data given here must match).

Writes, under --out/splits/
  wrist_train.csv, wrist_val.csv        same columns as wrist_test.csv
  boneage_train.csv, boneage_val.csv    same columns as boneage_test.csv
  group_status.csv     one row per (projection, age group): images and fractures in train, val and
                       test, `trainable`, and a `skip_reason` where train or val lacks a class
                       (04 skips such a group with that reason instead of failing)
  split_report.md      images, patients and fracture rate per split x projection x age group;
                       exclusions by reason, the quarantine, bone-age split sizes, the leak check
  02_split_trainval/config.json   how this stage was run

Wrist: the images of patients who are neither in the test set nor quarantined go to train or val,
stratified by (projection, age group, label) and grouped by patient: all of a patient's images,
both projections and every study, sit in one split (scikit-learn's StratifiedGroupKFold). Bone
age: one image per id, stratified by one-year bone-age bin x sex (StratifiedKFold). Both take one
of round(1/val-fraction) folds as val: --val-fraction 0.2 gives 5 folds, 0.15 gives 7 (1/7 = 0.14).

Leak check: no patient may sit in two of test (with the quarantine), train and val, and no bone-age
id in two splits; otherwise the stage stops before writing any split. The same --seed gives the same
files, byte for byte. Each track splits only if 01 drew its test set: a run with one dataset alone
writes that dataset's files and says in split_report.md that the other track was skipped.

Run:
  python 02_split_trainval.py                     # after 01_split_test.py on the demo data
  python 02_split_trainval.py --out outputs       # after 01 with --data and --boneage-data
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import common


def parse_args(argv=None):
    parser = common.make_parser(__doc__)
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="share of the non-test patients (wrist) and images (bone age) held out "
                             "for validation, rounded to 1/k for k folds (default: 0.2)")
    args = parser.parse_args(argv)
    if not 0 < args.val_fraction <= 0.5:
        raise common.InputError(f"--val-fraction {args.val_fraction}: give a share above 0 and at "
                                "most 0.5, e.g. 0.2")
    return args


def main(argv=None):
    args = parse_args(argv)
    test_report = read_test_report(args.out)
    args = common.resolve_common_args(use_data_of_test_stage(args, test_report))
    splits_dir = args.out / "splits"
    # Each track splits only when 01 drew its test set (one dataset alone is a complete run).
    wrist = split_wrist(args, test_report) if test_report["data"] is not None else None
    boneage = split_boneage(args) if test_report["boneage_data"] is not None else None

    # The leak check, before any split is written. The quarantine shares its patients with the
    # test set by design, so the two count as one side.
    wrist_overlap, boneage_overlap = {}, {}
    if wrist is not None:
        common.assert_no_patient_leak(wrist["leak_splits"])
        wrist_overlap = common.patient_overlap(wrist["leak_splits"])
    if boneage is not None:
        common.assert_no_patient_leak(boneage, key="id")
        boneage_overlap = common.patient_overlap(boneage, key="id")
    leak_line = leak_check_line(wrist_overlap, boneage_overlap)

    written = []
    if wrist is not None:
        common.write_csv(wrist["splits"]["train"], common.split_path(args.out, "wrist", "train"))
        common.write_csv(wrist["splits"]["val"], common.split_path(args.out, "wrist", "val"))
        common.write_csv(wrist["status"], splits_dir / "group_status.csv")
        written += ["wrist_train/val.csv", "group_status.csv"]
    if boneage is not None:
        common.write_csv(boneage["train"], common.split_path(args.out, "boneage", "train"))
        common.write_csv(boneage["val"], common.split_path(args.out, "boneage", "val"))
        written += ["boneage_train/val.csv"]
    report = split_report(wrist, test_report, boneage, leak_line)
    with common.atomic_path(splits_dir / "split_report.md") as tmp:
        tmp.write_text(report)
    common.write_run_config(splits_dir / "02_split_trainval", args)

    common.log(leak_line)
    if wrist is not None:
        for name, frame in wrist["splits"].items():
            common.log(f"wrist {name}: {len(frame)} images of {frame['patient_id'].nunique()} patients, "
                       f"{frame['label'].mean():.1%} with a visible fracture")
        common.log(f"wrist quarantine: {wrist['n_quarantine']} images (test patients' other images)")
        for row in wrist["status"][~wrist["status"]["trainable"]].itertuples():
            common.log(f"not trainable: {row.projection} {row.age_group_name}: {row.skip_reason}")
    if boneage is not None:
        common.log(f"bone age: train {len(boneage['train'])}, val {len(boneage['val'])}, "
                   f"test {len(boneage['test'])} images")
    common.log(f"wrote {splits_dir}: {', '.join(written + ['split_report.md'])}")


def split_wrist(args, test_report: dict) -> dict:
    """Train/val of the wrist images outside the test set and quarantine, grouped by patient."""
    edges = common.read_age_edges(args.out)
    wrist_test = common.read_split(args.out, "wrist", "test")
    quarantine = common.read_split(args.out, "wrist", "quarantine")
    # The same rows 01 drew from: same folder, same filters.
    wrist, excluded = common.read_wrist_metadata(args.data, **test_report["filters"])
    check_test_rows_present(wrist_test, wrist, args.data)
    wrist = common.sort_wrist(common.add_age_columns(wrist, edges))

    # Everyone who is neither a test patient nor quarantined, split by patient.
    held_out = pd.concat([wrist_test, quarantine])
    pool = wrist[~wrist["patient_id"].isin(held_out["patient_id"])]
    wrist_strata = (pool["projection_name"] + "/" + pool["age_group"].astype(str) + "/"
                    + pool["label"].astype(str))
    is_val = split_off_val(wrist_strata, pool["patient_id"], args.val_fraction, args.seed, "wrist")
    splits = {"train": pool[~is_val], "val": pool[is_val], "test": wrist_test}
    return {"splits": splits, "edges": edges, "excluded": excluded, "n_quarantine": len(quarantine),
            "status": group_status(splits, edges),
            "leak_splits": {"test+quarantine": held_out, "train": splits["train"], "val": splits["val"]}}


def split_boneage(args) -> dict[str, pd.DataFrame]:
    """Train/val of the bone-age images outside the test set (one image per id)."""
    boneage_test = common.read_split(args.out, "boneage", "test")
    boneage, _ = common.read_boneage_metadata(args.boneage_data)
    boneage = common.add_boneage_bin(boneage)
    pool = sort_boneage(boneage[~boneage["id"].isin(boneage_test["id"])])
    boneage_strata = pool["age_bin"].astype(str) + "/" + pool["sex"]
    is_val = split_off_val(boneage_strata, None, args.val_fraction, args.seed, "bone-age")
    return {"train": pool[~is_val], "val": pool[is_val], "test": boneage_test}


def sort_boneage(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(["age_bin", "sex", "id"])


def read_test_report(out: Path) -> dict:
    path = Path(out) / "splits" / "test_report.json"
    if not path.is_file():
        raise common.InputError(f"{path}: not found; run 01_split_test.py with the same --out first")
    return common.read_json(path)


def use_data_of_test_stage(args, test_report: dict):
    """Default --data/--boneage-data to the folders 01 drew the test sets from; a different one is
    an error, because the test patients would then not be held out of this data."""
    for flag, attribute in (("--data", "data"), ("--boneage-data", "boneage_data")):
        recorded = Path(test_report[attribute]) if test_report.get(attribute) else None
        given = getattr(args, attribute)
        if given is None:
            setattr(args, attribute, recorded)
        elif recorded is None:
            raise common.InputError(f"{flag} {given}: 01_split_test.py ran without {flag}, so it drew "
                                    f"no test set from it; rerun 01 with {flag} first")
        elif Path(given).resolve() != recorded:
            raise common.InputError(f"{flag} {given}: 01_split_test.py drew the test set from "
                                    f"{recorded}; leave {flag} out, or rerun 01 on the new folder")
    return args


def check_test_rows_present(wrist_test: pd.DataFrame, wrist: pd.DataFrame, data: Path) -> None:
    missing = ~wrist_test["filestem"].isin(wrist["filestem"])
    if missing.any():
        raise common.InputError(f"{data / 'dataset.csv'}: {int(missing.sum())} test images (e.g. "
                                f"{wrist_test['filestem'][missing].iloc[0]}) are no longer in it; "
                                "the dataset changed since 01_split_test.py ran: rerun 01, then 02")


def split_off_val(strata: pd.Series, groups: pd.Series | None, val_fraction: float, seed: int,
                  dataset: str) -> np.ndarray:
    """True for the rows of one fold of a stratified k-fold split, k = round(1/fraction), grouped
    when `groups` is given (bone age has one image per id, so nothing to group)."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    n_splits = round(1 / val_fraction)
    if groups is None:
        folds, group_labels = StratifiedKFold(n_splits, shuffle=True, random_state=seed), None
    else:
        # Seeded through the group labels, not shuffle=True: in scikit-learn 1.7, shuffle=True
        # permutes the groups' class counts but not their labels, so the folds stop being
        # stratified (scikit-learn issue #32478). np.unique sorts, so the CSV's row order is moot.
        unique_groups, group_index = np.unique(groups.to_numpy(), return_inverse=True)
        group_labels = np.random.default_rng(seed).permutation(len(unique_groups))[group_index]
        folds = StratifiedGroupKFold(n_splits)
    try:
        with warnings.catch_warnings():
            # Strata smaller than k (rare ages) are expected: their few patients go where they fit.
            warnings.filterwarnings("ignore", message="The least populated class")
            _, val_rows = next(folds.split(np.zeros(len(strata)), strata.to_numpy(), group_labels))
    except ValueError as error:
        raise common.InputError(f"{dataset}: too few images outside the test set to split into "
                                f"{n_splits} folds ({error}); lower --per-cell or "
                                "--boneage-test-fraction in 01, or raise --val-fraction") from None
    is_val = np.zeros(len(strata), dtype=bool)
    is_val[val_rows] = True
    return is_val


def leak_check_line(wrist_overlap: dict[str, int], boneage_overlap: dict[str, int]) -> str:
    def pairs(overlap):
        return ", ".join(f"{pair} {n}" for pair, n in overlap.items()) or "no bone-age track"
    wrist = ", ".join(f"{pair} {n}" for pair, n in wrist_overlap.items()) or "no wrist track"
    return (f"leak check: PASS (wrist patients shared: {wrist}; "
            f"bone-age ids shared: {pairs(boneage_overlap)})")


def group_status(splits: dict[str, pd.DataFrame], edges) -> pd.DataFrame:
    """Per (projection, age group): images and fractures per split, and whether 04 can train it.

    A group whose train or val split lacks a class cannot be trained (no gradient for the missing
    class) or early-stopped (AUC needs both classes): 04 skips it and says why.
    """
    names = common.age_group_names(edges)
    rows = []
    for projection in common.PROJECTIONS:
        for age_group, age_group_name in enumerate(names):
            row = {"projection": projection, "age_group": age_group, "age_group_name": age_group_name}
            for split, frame in splits.items():
                labels = frame.loc[(frame["projection_name"] == projection)
                                   & (frame["age_group"] == age_group), "label"]
                row[f"n_{split}"], row[f"positives_{split}"] = len(labels), int(labels.sum())
            reasons = [f"{split} has no {kind}"
                       for split in ("train", "val")
                       for kind, count in (("fracture", row[f"positives_{split}"]),
                                           ("normal", row[f"n_{split}"] - row[f"positives_{split}"]))
                       if count == 0]
            row["trainable"] = not reasons
            row["skip_reason"] = "; ".join(reasons)
            rows.append(row)
    return pd.DataFrame(rows)


def split_report(wrist: dict | None, test_report: dict, boneage_splits: dict | None, leak_line: str) -> str:
    """The markdown summary a reader checks before trusting any metric."""
    lines = ["# Splits", "", f"Seed {test_report['seed']}.", "", f"**{leak_line}**", ""]
    if wrist is None:
        lines += ["## Wrist", "", "_No wrist data given (--data): wrist track skipped._", ""]
    else:
        names = common.age_group_names(wrist["edges"])
        wrist_rows = []
        for split, frame in wrist["splits"].items():
            for (projection, age_group), group in frame.groupby(["projection_name", "age_group"]):
                wrist_rows.append([split, projection, names[age_group], len(group),
                                   group["patient_id"].nunique(), f"{group['label'].mean():.1%}"])
            wrist_rows.append([split, "all", "all", len(frame), frame["patient_id"].nunique(),
                               f"{frame['label'].mean():.1%}" if len(frame) else "-"])
        wrist_report = test_report["wrist"]
        duplicates = wrist_report.get("duplicate_stems", {}).get("stems", 0)
        lines += [
            f"Wrist test set: {test_report['per_cell']} images per (projection, age bin, class) cell, "
            f"{wrist_report['shortfall_images']} images short in {len(wrist_report['shortfalls'])} "
            "cells (see test_report.json).", "",
            "## Wrist images per split, projection and age group", "",
            markdown_table(["split", "projection", "age group", "images", "patients", "fracture rate"],
                           wrist_rows), "",
            f"Quarantined (test patients' other images, in no split): {wrist['n_quarantine']} images.", "",
            f"Wrist metadata: {common.format_exclusions(wrist['excluded'], wrist_report['rows'])} (filters: "
            + ", ".join(f"{name}={value}" for name, value in test_report["filters"].items()) + ")"
            + (f"; {duplicates} file stem(s) found more than once, the first in sorted path order used "
               "(test_report.json lists examples)" if duplicates else "") + ".", ""]
    lines += ["## Bone age", ""]
    if boneage_splits is None:
        lines += ["_No bone-age data given (--boneage-data): bone-age track skipped._", ""]
    else:
        boneage_rows = [[split, len(frame), f"{frame['boneage'].mean():.1f}", f"{frame['male'].mean():.1%}"]
                        for split, frame in boneage_splits.items()]
        duplicates = test_report["boneage"].get("duplicate_stems", {}).get("stems", 0)
        lines += [markdown_table(["split", "images", "mean bone age (months)", "male"], boneage_rows), "",
                  f"Test set: {test_report['boneage']['source']}."
                  + (f" {duplicates} image id(s) found more than once; the first in sorted path order "
                     "used." if duplicates else ""), ""]
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
