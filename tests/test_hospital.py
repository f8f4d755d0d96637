"""A hospital's own data: a table of image paths and labels trains 01->04, and 07 validates a run
on labelled images with the shared metric code (reproducing 04's own test AUC)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

import common
from conftest import load_stage

FAST = ["--image-size", "48", "--batch-size", "16", "--device", "cpu"]
PROJECTION_WORDS = {1: "AP", 2: "Lat", 3: "oblique"}
# How a hospital writes patient_id and study_id, made from GRAZPEDWRI-DX's patient and study numbers.
ID_STYLES = {
    "pseudonyms": (lambda patient, study: f"P{patient:05d}", lambda patient, study: f"ST{patient}-{study}"),
    "numbers": (lambda patient, study: patient, lambda patient, study: 100 * patient + study),
    "zero-padded": (lambda patient, study: f"{patient:04d}", lambda patient, study: f"{patient:04d}{study:02d}"),
}


def hospital_table(demo_root: Path, table_dir: Path, rows: pd.DataFrame | None = None,
                   ids: str = "pseudonyms") -> Path:
    """GRAZPEDWRI-DX demo rows re-written as a hospital would: paths relative to the table's own
    folder, patient and study IDs in one of ID_STYLES (pseudonymous text by default), words for
    the projection."""
    raw = rows if rows is not None else pd.read_csv(demo_root / "dataset.csv", encoding="utf-8-sig",
                                                    dtype={"filestem": str})
    index = common.index_images(demo_root)
    table_dir.mkdir(parents=True, exist_ok=True)
    numbers = list(zip(raw["patient_id"].astype(int), raw["study_number"].astype(int)))
    patient_id, study_id = ID_STYLES[ids]
    table = pd.DataFrame({
        "image_path": [os.path.relpath(index[stem], table_dir) for stem in raw["filestem"]],
        "patient_id": [patient_id(*pair) for pair in numbers],
        "study_id": [study_id(*pair) for pair in numbers],
        "age": raw["age"], "sex": raw["gender"],
        "projection": raw["projection"].map(PROJECTION_WORDS),
        "fracture": raw["fracture_visible"].fillna(0).astype(int),
        "laterality": raw["laterality"], "cast": raw["cast"].fillna(0).astype(int),
        "metal": raw["metal"].fillna(0).astype(int)})
    path = table_dir / "table.csv"
    table.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def hospital_run(small_demo, tmp_path_factory):
    """01 -> 04 on a hospital table built from the demo images; 04 fine-tunes from 03's router."""
    table = hospital_table(small_demo / "grazpedwri", tmp_path_factory.mktemp("hospital") / "tables")
    out = tmp_path_factory.mktemp("hospital_out")
    flags = ["--data", str(table), "--boneage-data", str(small_demo / "rsna_boneage"), "--out", str(out),
             "--preset", "demo"]
    load_stage("01_split_test").main([*flags, "--per-cell", "2"])
    load_stage("02_split_trainval").main(flags)
    load_stage("03_train_age").main([*flags, *FAST, "--epochs", "1"])
    load_stage("04_train_fracture_ddp").main([*flags, *FAST, "--epochs", "1", "--bootstrap", "100",
                                              "--min-epoch-samples", "0", "--init-from", str(out / "age" / "best.pt")])
    return table, out


def test_hospital_table_reads_like_dataset_csv(small_demo, tmp_path):
    root = small_demo / "grazpedwri"
    graz, graz_excluded = common.read_wrist_metadata(root)
    hospital, hospital_excluded = common.read_wrist_metadata(hospital_table(root, tmp_path / "t"))
    assert hospital_excluded == graz_excluded  # same filters, same counts (oblique, metal, ...)
    assert len(hospital) == len(graz)
    assert set(hospital["image_path"]) == set(graz["image_path"])
    by_path = hospital.set_index("image_path")
    expected = graz.set_index("image_path").loc[by_path.index]
    assert (by_path["label"] == expected["label"]).all()
    assert (by_path["projection_name"] == expected["projection_name"]).all()
    assert (by_path["age"] == expected["age"]).all() and (by_path["cast"] == expected["cast"]).all()
    assert by_path["patient_id"].str.startswith("P").all()
    assert (by_path["study_number"] == by_path["study_id"]).all()


def test_bad_hospital_table_is_one_line_error(small_demo, tmp_path):
    path = hospital_table(small_demo / "grazpedwri", tmp_path)
    table = pd.read_csv(path, dtype=str)
    table.drop(columns=["study_id"]).to_csv(tmp_path / "no_study.csv", index=False)
    with pytest.raises(common.InputError, match="no_study.csv: missing column\\(s\\) study_id"):
        common.read_wrist_metadata(tmp_path / "no_study.csv")
    table.assign(fracture=["yes"] + list(table["fracture"][1:])).to_csv(tmp_path / "bad_label.csv", index=False)
    with pytest.raises(common.InputError, match="bad_label.csv: fracture 'yes' on data row 1"):
        common.read_wrist_metadata(tmp_path / "bad_label.csv")
    missing = table.assign(image_path=["nowhere/x.png"] + list(table["image_path"][1:]))
    missing.to_csv(tmp_path / "missing.csv", index=False)
    _, excluded = common.read_wrist_metadata(tmp_path / "missing.csv", exclude_metal=False)
    assert excluded["image not found"] == 1


def test_hospital_table_runs_01_to_04_with_every_guarantee(hospital_run):
    table, out = hospital_run
    splits = {name: common.read_split(out, "wrist", name) for name in ("train", "val", "test", "quarantine")}
    overlap = common.patient_overlap(splits)  # quarantine = the test patients' other images, by design
    assert overlap["test/quarantine"] > 0
    assert all(count == 0 for pair, count in overlap.items() if pair != "test/quarantine"), overlap
    report = (out / "splits" / "split_report.md").read_text()
    assert "P0" in "".join(splits["test"]["patient_id"].astype(str))  # the hospital's own IDs
    assert "leak" in report.lower()
    summary = pd.read_csv(out / "fracture" / "summary.csv")
    assert (summary["status"] == "evaluated").any() or (summary["status"] == "trained").any()
    assert common.fracture_models(out / "fracture")  # what 07 deploys
    group = summary[(summary["kind"] == "model") & (summary["status"] == "trained")].iloc[0]
    checkpoint = common.load_checkpoint(out / "fracture" / group["projection"] / f"group{int(group['age_group'])}"
                                        / "best.pt")
    # 04 fine-tuned from 03's router: the starting weights' file and hash are in the checkpoint.
    assert checkpoint["init"].startswith("best.pt:")


def test_integer_ids_split_without_leak_and_04_trains(small_demo, tmp_path):
    """The issue: a table whose patient_id is a number put 188 test patients into train (02 read
    its ids as text and the test split's as numbers), its leak check passed, and 04 refused."""
    table = hospital_table(small_demo / "grazpedwri", tmp_path / "tables", ids="numbers")
    assert pd.read_csv(table)["patient_id"].dtype.kind == "i"  # plain numbers in the CSV
    out = tmp_path / "out"
    flags = ["--data", str(table), "--out", str(out), "--preset", "demo"]
    load_stage("01_split_test").main([*flags, "--per-cell", "2"])
    load_stage("02_split_trainval").main(flags)
    _assert_ids_as_written_and_test_patients_held_out(table, out)
    load_stage("04_train_fracture_ddp").main([*flags, "--image-size", "32", "--batch-size", "16", "--device", "cpu",
                                              "--epochs", "1", "--projections", "AP", "--groups", "2",
                                              "--init", "scratch", "--min-epoch-samples", "0", "--bootstrap", "20"])
    summary = pd.read_csv(out / "fracture" / "summary.csv")
    assert (summary["status"] == "trained").any(), summary[["kind", "status", "reason"]]


def test_zero_padded_ids_keep_their_zeros_through_01_02_and_read_split(small_demo, tmp_path):
    """'0012' is not patient 12: wrist and bone-age ids come out of every split as written."""
    table = hospital_table(small_demo / "grazpedwri", tmp_path / "tables", ids="zero-padded")
    boneage = _zero_padded_boneage(small_demo / "rsna_boneage", tmp_path / "boneage")
    out = tmp_path / "out"
    flags = ["--data", str(table), "--boneage-data", str(boneage), "--out", str(out), "--preset", "demo"]
    load_stage("01_split_test").main([*flags, "--per-cell", "2"])
    load_stage("02_split_trainval").main(flags)
    _assert_ids_as_written_and_test_patients_held_out(table, out)
    written = pd.read_csv(boneage / "boneage-training-dataset.csv", dtype=str)["id"]
    splits = {split: common.read_split(out, "boneage", split) for split in ("test", "train", "val")}
    assert sorted(pd.concat(splits.values())["id"]) == sorted(written)
    assert set(common.patient_overlap(splits, key="id").values()) == {0}


def _zero_padded_boneage(source: Path, target: Path) -> Path:
    """The demo's RSNA folder with every id written as '00<id>', its images linked under that name."""
    labels = pd.read_csv(source / "boneage-training-dataset.csv", dtype=str)
    images = target / "boneage-training-dataset"
    images.mkdir(parents=True)
    for old in labels["id"]:
        (images / f"00{old}.png").symlink_to(source / "boneage-training-dataset" / f"{old}.png")
    labels.assign(id="00" + labels["id"]).to_csv(target / "boneage-training-dataset.csv", index=False)
    return target


def _assert_ids_as_written_and_test_patients_held_out(table: Path, out: Path) -> None:
    """Every split's patient ids are the table's text, and no test patient is in train or val."""
    written = set(pd.read_csv(table, dtype=str)["patient_id"])
    splits = {name: common.read_split(out, "wrist", name) for name in ("test", "quarantine", "train", "val")}
    for name, frame in splits.items():
        as_text = pd.read_csv(common.split_path(out, "wrist", name), dtype=str)["patient_id"]
        assert frame["patient_id"].tolist() == as_text.tolist(), name  # read_split parses nothing
        assert set(as_text) <= written, (name, sorted(set(as_text) - written)[:3])
    held_out = set(splits["test"]["patient_id"]) | set(splits["quarantine"]["patient_id"])
    trained_on = set(splits["train"]["patient_id"]) | set(splits["val"]["patient_id"])
    assert held_out and trained_on and not held_out & trained_on
    report = (out / "splits" / "split_report.md").read_text()
    assert "wrist patients shared: test+quarantine/train 0, test+quarantine/val 0, train/val 0" in report


def _test_split_table(table: Path, out: Path, target: Path) -> Path:
    """The hospital table's rows of the test split: what a hospital's labelled worklist looks like."""
    rows = pd.read_csv(table, dtype=str)
    test = common.read_split(out, "wrist", "test")
    resolved = rows["image_path"].map(lambda p: str(common.resolve_table_path(table, p)))
    chosen = rows[resolved.isin(set(test["image_path"]))]
    assert len(chosen) == len(test)
    chosen.assign(image_path=resolved[chosen.index]).to_csv(target, index=False)  # absolute paths
    return target


def test_07_external_validation_reproduces_04s_cascade_auc(hospital_run, tmp_path):
    table, out = hospital_run
    worklist = _test_split_table(table, out, tmp_path / "worklist.csv")
    load_stage("07_predict").main([str(worklist), "--models", str(out), "--out", str(tmp_path / "ext"),
                                   "--device", "cpu", "--bootstrap", "200"])
    evaluation = json.loads((tmp_path / "ext" / "evaluation.json").read_text())
    summary = pd.read_csv(out / "fracture" / "summary.csv").set_index("kind")
    cascade = summary.loc["cascade_true_group"]
    assert evaluation["n_images"] == cascade["n_test"]
    assert evaluation["image"]["auc"] == pytest.approx(cascade["test_auc"], abs=1e-9)
    image = evaluation["image"]
    for name in ("auc", "sensitivity", "specificity", "ppv", "npv"):
        assert f"{name}_lo" in image and f"{name}_hi" in image
    assert image["auc_lo"] <= image["auc"] <= image["auc_hi"]
    rows = pd.read_csv(worklist)
    skipped = pd.read_csv(tmp_path / "ext" / "skipped.csv")
    assert evaluation["n_skipped"] == len(skipped) == len(rows) - evaluation["n_images"]
    assert evaluation["n_patients"] == rows[~rows["image_path"].isin(skipped["input_path"])]["patient_id"].nunique()
    # Study level: one row per (patient, study, laterality), positive if any image is.
    predictions = pd.read_csv(tmp_path / "ext" / "predictions.csv")
    assert evaluation["study"]["n"] == (predictions["level"] == "study").sum() == evaluation["n_studies"]
    assert 0 <= evaluation["calibration"]["image"]["brier"] <= 1
    subgroups = pd.read_csv(tmp_path / "ext" / "subgroups.csv")
    assert set(subgroups["subgroup"]) >= {"projection", "age_group_name", "sex", "laterality"}
    markdown = (tmp_path / "ext" / "EVALUATION.md").read_text()
    assert f"{image['auc']:.3f} [{image['auc_lo']:.3f}, {image['auc_hi']:.3f}]" in markdown
    for figure in ("roc.png", "pr.png", "reliability.png"):
        assert (tmp_path / "ext" / figure).stat().st_size > 0


def test_07_bone_age_table_gives_mae_with_ci(tmp_path):
    from test_predict import write_png16
    predict = load_stage("07_predict")
    models = tmp_path / "models"
    _tiny_models(models)
    rows = []
    for i in range(8):
        write_png16(tmp_path / "hands" / f"hand_{i}.png", seed=i)
        rows.append({"image_path": f"hands/hand_{i}.png", "patient_id": f"H{i // 2}", "sex": "MF"[i % 2],
                     "boneage": 60 + 12 * i})
    pd.DataFrame(rows).to_csv(tmp_path / "hands.csv", index=False)
    predict.main([str(tmp_path / "hands.csv"), "--models", str(models), "--out", str(tmp_path / "ext"),
                  "--device", "cpu", "--boneage", "--bootstrap", "200"])
    evaluation = json.loads((tmp_path / "ext" / "evaluation.json").read_text())
    predictions = pd.read_csv(tmp_path / "ext" / "predictions.csv")
    true = pd.DataFrame(rows)["boneage"].to_numpy()
    assert evaluation["n_images"] == 8 and evaluation["n_patients"] == 4 and "image" not in evaluation
    bone = evaluation["boneage"]
    assert bone["n"] == 8 and bone["mae"] == pytest.approx(abs(predictions["bone_age_months"] - true).mean(), abs=0.1)
    assert bone["mae_lo"] <= bone["mae"] <= bone["mae_hi"]
    assert "Bone age: MAE" in (tmp_path / "ext" / "EVALUATION.md").read_text()


def _tiny_models(out: Path) -> None:
    """A fracture model (07 needs one) and a bone-age model, untrained."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = common.create_model("test_resnet", num_classes=1)
    common.save_checkpoint({"kind": "classifier", "task": "fracture", "arch": "test_resnet", "num_classes": 1,
                            "image_size": 32, "projection": "AP", "age_group": 1, "age_edges": [5.0, 10.0, 15.0],
                            "route": "true", "threshold": 0.5, "state_dict": model.state_dict()},
                           out / "fracture" / "AP" / "group1" / "best.pt")
    boneage = common.build_boneage_model("resnet10t", init_months=120.0)
    common.save_checkpoint({"kind": "boneage", "arch": "resnet10t", "max_months": common.BONEAGE_MAX_MONTHS,
                            "image_size": 32, "state_dict": boneage.state_dict()}, out / "boneage" / "best.pt")
