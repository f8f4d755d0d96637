"""01_split_test.py and 02_split_trainval.py: leak-free by construction, proven at real scale.

The real-scale tests run both stages on the published GRAZPEDWRI-DX and RSNA label files (from
../shared/reference; skipped without it) with an empty placeholder PNG per row: the split stages
index images but never decode them, so this is the code path of a real run. `pytest -s` prints the
figures worth quoting.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import common
from conftest import load_stage

SPLIT_FILES = ["wrist_test.csv", "wrist_quarantine.csv", "wrist_train.csv", "wrist_val.csv",
               "boneage_test.csv", "boneage_train.csv", "boneage_val.csv", "age_groups.json",
               "test_report.json", "group_status.csv", "split_report.md"]


def run_splits(wrist_root: Path, boneage_root: Path, out: Path, *extra: str, seed: int = 42) -> dict:
    """Run 01 then 02 in-process; return the seconds each took."""
    seconds = {}
    common_flags = ["--data", str(wrist_root), "--boneage-data", str(boneage_root), "--out", str(out),
                    "--seed", str(seed)]
    for stage, flags in (("01_split_test", [*common_flags, *extra]), ("02_split_trainval", common_flags)):
        start = time.perf_counter()
        load_stage(stage).main(flags)
        seconds[stage] = time.perf_counter() - start
    return seconds


def read_splits(out: Path) -> SimpleNamespace:
    return SimpleNamespace(
        **{f"wrist_{s}": common.read_split(out, "wrist", s) for s in ("test", "quarantine", "train", "val")},
        **{f"boneage_{s}": common.read_split(out, "boneage", s) for s in ("test", "train", "val")},
        report=common.read_json(out / "splits" / "test_report.json"),
        status=pd.read_csv(out / "splits" / "group_status.csv", keep_default_na=False))


def write_placeholder_images(folder: Path, stems, parts: int = 1) -> None:
    """Empty <stem>.png files, spread over images_part1..N when parts > 1."""
    folders = [folder / f"images_part{i + 1}" for i in range(parts)] if parts > 1 else [folder]
    for path in folders:
        path.mkdir(parents=True, exist_ok=True)
    for i, stem in enumerate(stems):
        (folders[i % parts] / f"{stem}.png").touch()


# ------------------------------------------------------------------------------------------------
# Real scale: 20,327 wrist rows, 12,611 bone-age rows
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_data(reference_dir, tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("real_data")
    wrist, boneage = root / "grazpedwri", root / "rsna_boneage"
    wrist.mkdir()
    shutil.copy(reference_dir / "grazpedwri_dx_metadata.csv", wrist / "dataset.csv")
    stems = pd.read_csv(wrist / "dataset.csv", encoding="utf-8-sig", dtype=str)["filestem"]
    write_placeholder_images(wrist, stems, parts=4)
    boneage.mkdir()
    shutil.copy(reference_dir / "rsna_boneage_train_labels.csv", boneage / "boneage-training-dataset.csv")
    ids = pd.read_csv(boneage / "boneage-training-dataset.csv", dtype=str)["id"]
    write_placeholder_images(boneage / "boneage-training-dataset", ids)
    return SimpleNamespace(wrist=wrist, boneage=boneage)


@pytest.fixture(scope="module")
def real_run(real_data, tmp_path_factory) -> SimpleNamespace:
    out = tmp_path_factory.mktemp("real_out")
    seconds = run_splits(real_data.wrist, real_data.boneage, out)
    run = read_splits(out)
    run.out, run.seconds = out, seconds
    run.kept, _ = common.read_wrist_metadata(real_data.wrist)
    return run


def test_real_no_patient_in_two_splits(real_run):
    held_out = pd.concat([real_run.wrist_test, real_run.wrist_quarantine])
    overlap = common.patient_overlap({"test": real_run.wrist_test, "train": real_run.wrist_train,
                                      "val": real_run.wrist_val})
    overlap |= common.patient_overlap({"quarantine": real_run.wrist_quarantine,
                                       "train": real_run.wrist_train, "val": real_run.wrist_val})
    overlap |= common.patient_overlap({"test": real_run.boneage_test, "train": real_run.boneage_train,
                                       "val": real_run.boneage_val}, key="id")
    assert set(overlap.values()) == {0}, overlap
    assert not held_out["filestem"].duplicated().any()
    assert "leak check: PASS" in (real_run.out / "splits" / "split_report.md").read_text()


@pytest.mark.parametrize("run_name", ["real_run", "demo_run"])
def test_every_kept_image_in_one_place_and_test_patients_quarantined(run_name, request):
    """The four wrist files partition the kept rows, and a test patient is nowhere else: dataset.csv's
    integer patient ids and the split CSVs' meet as the same text (else 02 keeps test patients)."""
    run = request.getfixturevalue(run_name)
    parts = [run.wrist_test, run.wrist_quarantine, run.wrist_train, run.wrist_val]
    placed = pd.concat(parts)["filestem"]
    assert not placed.duplicated().any()
    assert set(placed) == set(run.kept["filestem"])
    test_patients = set(run.wrist_test["patient_id"])
    of_test_patients = run.kept[run.kept["patient_id"].isin(test_patients)]
    other_images = set(of_test_patients["filestem"]) - set(run.wrist_test["filestem"])
    assert other_images == set(run.wrist_quarantine["filestem"])
    assert set(run.wrist_quarantine["patient_id"]) <= test_patients
    assert not test_patients & set(pd.concat([run.wrist_train, run.wrist_val])["patient_id"])


def test_real_test_cells_filled_as_reported(real_run):
    per_cell = real_run.report["per_cell"]
    recount = real_run.wrist_test.groupby(["projection_name", "age_bin", "label"]).size()
    cells = pd.DataFrame(real_run.report["wrist"]["cells"])
    reported = cells.set_index(["projection", "age_bin", "label"])["filled"]
    assert recount.reindex(reported.index, fill_value=0).tolist() == reported.tolist()
    assert len(recount) == (reported > 0).sum()  # no image outside the 80 cells
    assert recount.max() <= per_cell
    assert set(real_run.wrist_test["projection_name"]) == {"AP", "Lat"}
    # "As far as possible": a cell that falls short holds every kept image of its cell.
    kept = real_run.kept.assign(age_bin=np.floor(real_run.kept["age"]).astype(int))
    available = kept.groupby(["projection_name", "age_bin", "label"]).size()
    short = reported[cells.set_index(["projection", "age_bin", "label"])["shortfall"] > 0]
    assert len(short) > 0
    assert available.reindex(short.index, fill_value=0).tolist() == short.tolist()
    assert (real_run.wrist_test["age_group"] == common.age_group_of(
        real_run.wrist_test["age"], real_run.report["age_edges"])).all()


def test_real_same_seed_same_bytes_other_seed_other_test(real_data, real_run, tmp_path):
    again = tmp_path / "again"
    run_splits(real_data.wrist, real_data.boneage, again)
    for name in SPLIT_FILES:
        assert (again / "splits" / name).read_bytes() == (real_run.out / "splits" / name).read_bytes(), name

    # The draw depends on the seed, not on the row order of dataset.csv.
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    table = pd.read_csv(real_data.wrist / "dataset.csv", encoding="utf-8-sig", dtype=str)
    table.sample(frac=1, random_state=1).to_csv(shuffled / "dataset.csv", index=False)
    for part in range(1, 5):
        os.symlink(real_data.wrist / f"images_part{part}", shuffled / f"images_part{part}")
    load_stage("01_split_test").main(["--data", str(shuffled), "--boneage-data", str(real_data.boneage),
                                      "--out", str(tmp_path / "shuffled_out")])
    shuffled_test = common.read_split(tmp_path / "shuffled_out", "wrist", "test")
    assert shuffled_test["filestem"].tolist() == real_run.wrist_test["filestem"].tolist()

    other = tmp_path / "other_seed"
    load_stage("01_split_test").main(["--data", str(real_data.wrist), "--boneage-data",
                                      str(real_data.boneage), "--out", str(other), "--seed", "7"])
    other_test = common.read_split(other, "wrist", "test")
    assert set(other_test["filestem"]) != set(real_run.wrist_test["filestem"])
    assert set(common.read_split(other, "boneage", "test")["id"]) != set(real_run.boneage_test["id"])


def test_real_train_val_stratified(real_run):
    train, val = real_run.wrist_train, real_run.wrist_val
    for key, val_group in val.groupby(["projection_name", "age_group"]):
        train_group = train[(train["projection_name"] == key[0]) & (train["age_group"] == key[1])]
        val_share = len(val_group) / (len(val_group) + len(train_group))
        assert abs(val_share - 0.2) < 0.03, (key, val_share)
        assert abs(val_group["label"].mean() - train_group["label"].mean()) < 0.03, key
    assert real_run.status["trainable"].all()
    boneage_val_share = len(real_run.boneage_val) / (len(real_run.boneage_val) + len(real_run.boneage_train))
    assert abs(boneage_val_share - 0.2) < 0.01


def test_real_boneage_test_fraction_and_strata(real_run):
    test = real_run.boneage_test
    everyone = pd.concat([test, real_run.boneage_train, real_run.boneage_val])
    assert len(everyone) == 12611
    assert 0.09 < len(test) / len(everyone) < 0.11
    strata = everyone.groupby(["age_bin", "sex"]).size()
    tested = test.groupby(["age_bin", "sex"]).size().reindex(strata.index, fill_value=0)
    assert (tested[strata >= 2] >= 1).all()
    assert (tested[strata == 1] == 0).all()
    assert (tested <= np.maximum(1, np.round(0.10 * strata)) + 1).all()


def test_real_runtime_and_figures(real_run):
    report = real_run.report["wrist"]
    shortfalls = [f"{c['projection']} [{c['age_bin']},{c['age_bin'] + 1}) label {c['label']}: "
                  f"{c['filled']}/{c['wanted']}" for c in report["shortfalls"]]
    print(f"\nwrist test images per projection: {report['test_images']} "
          f"({report['test_patients']} patients)")
    print(f"shortfall cells ({report['shortfall_images']} images): {'; '.join(shortfalls)}")
    print(f"quarantined images: {report['quarantine_images']}")
    for split in ("train", "val"):
        frame = getattr(real_run, f"wrist_{split}")
        print(f"wrist {split}: {len(frame)} images, {frame['patient_id'].nunique()} patients")
    print(f"bone age test/train/val: {len(real_run.boneage_test)}/{len(real_run.boneage_train)}/"
          f"{len(real_run.boneage_val)}")
    print("seconds: " + ", ".join(f"{stage} {s:.1f}" for stage, s in real_run.seconds.items()))
    assert all(seconds < 60 for seconds in real_run.seconds.values()), real_run.seconds


# ------------------------------------------------------------------------------------------------
# Bad input: one line that names the file, the problem and the fix
# ------------------------------------------------------------------------------------------------

def test_missing_data_folder(tmp_path):
    with pytest.raises(common.InputError, match="data folder not found"):
        load_stage("01_split_test").main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path)])


def test_missing_required_column(tmp_path):
    wrist = tmp_path / "wrist"
    wrist.mkdir()
    pd.DataFrame({"filestem": ["a"], "age": [5.0]}).to_csv(wrist / "dataset.csv", index=False)
    with pytest.raises(common.InputError, match="missing required column.*patient_id"):
        load_stage("01_split_test").main(["--data", str(wrist), "--out", str(tmp_path)])


def test_age_edges_not_increasing(tmp_path):
    with pytest.raises(common.InputError, match="--age-edges '10,5': give strictly increasing"):
        load_stage("01_split_test").main(["--age-edges", "10,5", "--out", str(tmp_path)])


def test_trainval_before_test_split(tmp_path):
    with pytest.raises(common.InputError, match="run 01_split_test.py"):
        load_stage("02_split_trainval").main(["--out", str(tmp_path)])


# ------------------------------------------------------------------------------------------------
# The small demo
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_run(small_demo, tmp_path_factory) -> SimpleNamespace:
    out = tmp_path_factory.mktemp("demo_splits")
    run_splits(small_demo / "grazpedwri", small_demo / "rsna_boneage", out, "--preset", "demo")
    run = read_splits(out)
    run.out = out
    run.kept, _ = common.read_wrist_metadata(small_demo / "grazpedwri")
    return run


def test_demo_writes_every_file(demo_run):
    for name in SPLIT_FILES:
        assert (demo_run.out / "splits" / name).is_file(), name
    for stage in ("01_split_test", "02_split_trainval"):
        assert (demo_run.out / "splits" / stage / "config.json").is_file()
    assert demo_run.report["per_cell"] == 4  # the demo preset's default
    assert common.read_age_edges(demo_run.out) == (5.0, 10.0, 15.0)
    assert list(demo_run.wrist_train.columns) == list(demo_run.wrist_test.columns)
    assert list(demo_run.boneage_train.columns) == ["id", "boneage", "male", "sex", "image_path", "age_bin"]


def test_demo_group_status_coherent(demo_run):
    status = demo_run.status
    names = common.age_group_names(common.read_age_edges(demo_run.out))
    assert len(status) == len(common.PROJECTIONS) * len(names)
    for row in status.itertuples():
        for split in ("train", "val", "test"):
            frame = getattr(demo_run, f"wrist_{split}")
            group = frame[(frame["projection_name"] == row.projection)
                          & (frame["age_group"] == row.age_group)]
            assert getattr(row, f"n_{split}") == len(group)
            assert getattr(row, f"positives_{split}") == group["label"].sum()
        both_classes = all(0 < getattr(row, f"positives_{split}") < getattr(row, f"n_{split}")
                           for split in ("train", "val"))
        assert row.trainable == both_classes
        assert (row.skip_reason == "") == row.trainable
        assert row.age_group_name == names[row.age_group]


def test_demo_nan_ages_are_counted_and_skipped(small_demo, tmp_path):
    wrist = tmp_path / "wrist"
    wrist.mkdir()
    table = pd.read_csv(small_demo / "grazpedwri" / "dataset.csv", encoding="utf-8-sig", dtype=str)
    already_missing = table["age"].isna().sum()
    table.loc[table.index[:5], "age"] = np.nan
    table.to_csv(wrist / "dataset.csv", index=False)
    for part in (small_demo / "grazpedwri").glob("images_part*"):
        os.symlink(part, wrist / part.name)
    load_stage("01_split_test").main(["--data", str(wrist), "--boneage-data",
                                      str(small_demo / "rsna_boneage"), "--out", str(tmp_path / "out"),
                                      "--per-cell", "1"])
    report = common.read_json(tmp_path / "out" / "splits" / "test_report.json")
    assert report["wrist"]["excluded"]["age missing"] == already_missing + 5
    test = common.read_split(tmp_path / "out", "wrist", "test")
    assert not set(table["filestem"][:5]) & set(test["filestem"])


def test_demo_own_boneage_test_csv(small_demo, demo_run, tmp_path):
    """--boneage-test-csv in the RSNA validation layout; 02 keeps its ids out of train and val."""
    own = tmp_path / "own_test"
    own.mkdir()
    labels = pd.read_csv(small_demo / "rsna_boneage" / "boneage-training-dataset.csv", dtype=str).head(15)
    labels.rename(columns={"id": "Image ID", "boneage": "Bone Age (months)"}).to_csv(
        own / "validation.csv", index=False)
    write_placeholder_images(own / "images", labels["id"])
    out = tmp_path / "out"
    run_splits(small_demo / "grazpedwri", small_demo / "rsna_boneage", out, "--preset", "demo",
               "--boneage-test-csv", str(own / "validation.csv"))
    run = read_splits(out)
    assert sorted(run.boneage_test["id"]) == sorted(labels["id"])
    assert not set(labels["id"]) & set(pd.concat([run.boneage_train, run.boneage_val])["id"])


def test_trainval_refuses_other_data_folder(demo_run, tmp_path):
    with pytest.raises(common.InputError, match="drew the test set from"):
        load_stage("02_split_trainval").main(["--out", str(demo_run.out), "--data", str(tmp_path)])


def test_trainval_never_writes_a_leaking_split(small_demo, tmp_path, monkeypatch):
    """If a future change split a patient across train and val, 02 stops before writing."""
    out = tmp_path / "out"
    load_stage("01_split_test").main(["--data", str(small_demo / "grazpedwri"), "--boneage-data",
                                      str(small_demo / "rsna_boneage"), "--out", str(out),
                                      "--per-cell", "1"])
    stage = load_stage("02_split_trainval")
    monkeypatch.setattr(stage, "split_off_val", lambda strata, *_: np.arange(len(strata)) % 2 == 1)
    with pytest.raises(common.InputError, match="patients shared between splits"):
        stage.main(["--out", str(out)])
    assert not (out / "splits" / "wrist_train.csv").exists()


ID_TYPES = {"int": lambda ids: pd.Series(ids, dtype="int64"),
            "str": lambda ids: pd.Series([str(i) for i in ids], dtype=object),
            "float": lambda ids: pd.Series([*ids, None], dtype="float64")}  # pandas' int column with a gap


@pytest.mark.parametrize("test_type, train_type", [("int", "int"), ("str", "str"), ("int", "str"),
                                                   ("str", "int"), ("float", "str")])
def test_leak_check_compares_ids_as_text(test_type, train_type):
    test = pd.DataFrame({"patient_id": ID_TYPES[test_type]([12, 13])})
    train = pd.DataFrame({"patient_id": ID_TYPES[train_type]([13, 14])})
    assert common.patient_overlap({"test": test, "train": train}) == {"test/train": 1}
    with pytest.raises(common.InputError, match="patients shared between splits {'test/train': 1}"):
        common.assert_no_patient_leak({"test": test, "train": train})
    apart = pd.DataFrame({"patient_id": ID_TYPES[train_type]([14, 15])})
    common.assert_no_patient_leak({"test": test, "train": apart})


@pytest.mark.parametrize("dtype", ["int64", "float64"])
def test_trainval_leak_check_sees_test_patients_whatever_their_dtype(small_demo, tmp_path, monkeypatch, dtype):
    """The issue's failure, forced: test ids read as numbers miss 02's text ids, so its exclusion
    leaves test patients in the pool; the leak check must still see them and stop 02."""
    out = tmp_path / "out"
    load_stage("01_split_test").main(["--data", str(small_demo / "grazpedwri"), "--out", str(out), "--per-cell", "1"])
    read_split = common.read_split

    def numeric_ids(out, dataset, split):
        return read_split(out, dataset, split).astype({"patient_id": dtype})

    monkeypatch.setattr(common, "read_split", numeric_ids)
    with pytest.raises(common.InputError, match=r"patients shared between splits \{'test\+quarantine/train': [1-9]"):
        load_stage("02_split_trainval").main(["--out", str(out)])
    assert not (out / "splits" / "wrist_train.csv").exists()
