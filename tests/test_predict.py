"""07_predict: what a hospital runs on new images.

The models folder is made cheaply: freshly initialised resnet10t checkpoints in the places 03, 04
and 05 write them (no training: these tests check the plumbing, not accuracy). The age router's
head is set to always answer group 1, so "predicted by the router" is checkable.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

import common
from conftest import cr_dicom, load_stage

EDGES = [5.0, 10.0, 15.0]
SIZE = 32
THRESHOLDS = {("AP", 1): 0.5, ("Lat", 1): 0.45, ("AP", 2): 0.55, ("Lat", 2): 0.5}
IMAGE_COLUMNS = ["level", "input_path", "study_id", "laterality", "projection", "projection_source", "age_group",
                 "age_group_name", "age_group_source", "fracture_prob", "raw_prob", "fracture_pred", "threshold",
                 "model", "model_age", "n_images"]


@pytest.fixture(scope="module")
def predict():
    return load_stage("07_predict")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """outputs/ as 03/04/05 leave it: fracture models for groups 1 and 2 (group 0 was skipped in
    training, as summary.csv says), the age router, the bone-age model."""
    out = tmp_path_factory.mktemp("outputs")
    torch.manual_seed(0)
    for (projection, group), threshold in THRESHOLDS.items():
        model = common.create_model("resnet10t", num_classes=1)
        common.save_checkpoint({"kind": "classifier", "task": "fracture", "arch": "resnet10t",
                                "num_classes": 1, "image_size": SIZE, "projection": projection,
                                "age_group": group, "age_edges": EDGES, "route": "true",
                                "threshold": threshold, "state_dict": model.state_dict()},
                               out / "fracture" / projection / f"group{group}" / "best.pt")
    common.write_csv(pd.DataFrame([
        {"kind": "model", "projection": "AP", "age_group": 0, "status": "skipped",
         "reason": "train has only no-fracture images (3)"},
        {"kind": "model", "projection": "AP", "age_group": 1, "status": "trained", "reason": ""}]),
        out / "fracture" / "summary.csv")
    router = common.create_model("resnet10t", num_classes=4)
    with torch.no_grad():
        router.fc.weight.zero_()
        router.fc.bias.copy_(torch.tensor([0.0, 5.0, 0.0, 0.0]))
    common.save_checkpoint({"kind": "classifier", "task": "age_group", "arch": "resnet10t",
                            "num_classes": 4, "image_size": SIZE, "age_edges": EDGES,
                            "group_names": common.age_group_names(EDGES),
                            "state_dict": router.state_dict()}, out / "age" / "best.pt")
    boneage = common.build_boneage_model("resnet10t", init_months=120.0)
    common.save_checkpoint({"kind": "boneage", "arch": "resnet10t", "max_months": common.BONEAGE_MAX_MONTHS,
                            "image_size": SIZE, "state_dict": boneage.state_dict()},
                           out / "boneage" / "best.pt")
    return out


def write_png16(path: Path, seed: int, shape=(90, 50)) -> Path:
    """A demo-like 16-bit radiograph: noise plus a bright 'bone' bar, full 0-65535 range."""
    rng = np.random.default_rng(seed)
    image = rng.integers(2000, 30000, shape).astype(np.uint16)
    image[shape[0] // 5: -shape[0] // 5, shape[1] // 3: 2 * shape[1] // 3] = 60000 - 1000 * seed
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


def write_corrupt_png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 20)
    return path



def run(predict, inputs, models: Path, out: Path, *flags) -> tuple[pd.DataFrame, pd.DataFrame]:
    predict.main([*map(str, inputs), "--models", str(models), "--out", str(out), "--device", "cpu",
                  "--batch-size", "4", *flags])
    table = pd.read_csv(out / "predictions.csv", dtype={"study_id": str})
    return table, pd.read_csv(out / "skipped.csv", keep_default_na=False)


def check_image_rows(rows: pd.DataFrame) -> None:
    assert rows["fracture_prob"].between(0, 1).all()
    assert (rows["fracture_pred"] == (rows["fracture_prob"] >= rows["threshold"]).astype(int)).all()
    for row in rows.itertuples():
        group = int(row.age_group)
        assert row.model == f"fracture/{row.projection}/group{group}/best.pt"
        assert row.threshold == THRESHOLDS[(row.projection, group)]
        assert row.age_group_name == common.age_group_names(EDGES)[group]


def test_folder_and_dicom_with_router_and_counted_skips(predict, models, tmp_path, capsys):
    import pydicom
    folder = tmp_path / "new_images"
    for i in range(5):
        write_png16(folder / ("sub" if i % 2 else "") / f"wrist_{i}.png", seed=i)
    write_corrupt_png(folder / "broken.png")
    (folder / "notes.txt").write_text("not an image")
    dicom = shutil.copy(cr_dicom(), tmp_path / "cr_scan.dcm")

    table, skipped = run(predict, [folder, dicom], models, tmp_path / "out", "--projection", "Lat")
    assert table.columns.tolist() == IMAGE_COLUMNS
    # The DICOM is one study of its own (its Study Instance UID, hashed), the PNGs have none.
    assert table["level"].tolist().count("image") == 6 and table["level"].tolist().count("study") == 1
    study = table[table["level"] == "study"].iloc[0]
    table = table[table["level"] == "image"]
    check_image_rows(table)
    by_name = table.set_index(table["input_path"].map(lambda p: Path(p).name))
    # The DICOM's ViewPosition (AP) wins over --projection; the PNGs have only the flag.
    assert by_name.loc["cr_scan.dcm", ["projection", "projection_source"]].tolist() == ["AP", "dicom"]
    assert by_name.loc["cr_scan.dcm", "laterality"] == "R" and study["laterality"] == "R"
    assert study["study_id"] == by_name.loc["cr_scan.dcm", "study_id"] and study["n_images"] == 1
    pngs = by_name.drop(index="cr_scan.dcm")
    assert (pngs["projection"] == "Lat").all() and (pngs["projection_source"] == "flag").all()
    # No age anywhere (the DICOM has no PatientAge): the router's group 1 for all.
    assert (table["age_group"] == 1).all() and (table["age_group_source"] == "predicted").all()

    assert skipped.to_dict("records") == [{"input_path": str(folder / "broken.png"),
                                           "reason": "unreadable image", "detail": skipped["detail"][0],
                                           "task": "any"}]  # no task can use a file that cannot be read
    assert "cannot decode" in skipped["detail"][0]
    output = capsys.readouterr().out
    assert "predicted 6 images and 1 studies; skipped 1 (1 unreadable image)" in output
    assert "Traceback" not in output

    # Nothing that identifies the patient leaves the hospital's DICOM.
    header = pydicom.dcmread(dicom, stop_before_pixels=True)
    written = "".join(p.read_text() for p in (tmp_path / "out").glob("*.*"))
    for value in (str(header.PatientName), str(header.PatientID), str(header.PatientBirthDate),
                  str(header.AccessionNumber), str(header.InstitutionName), str(header.StudyInstanceUID)):
        assert value and value not in written, value


def test_csv_with_projection_age_sex_and_studies(predict, models, tmp_path):
    images = tmp_path / "worklist_images"
    rows = [  # path (relative to the CSV), projection, age, sex, study_id
        ("a_ap.png", "AP", "7.5", "F", "S1"),
        ("a_lat.png", "lateral", "7.5", "F", "S1"),
        ("b_ap.png", "AP", "12", "M", "S2"),
        ("b_lat.png", "Lat", "", "M", "S2"),      # no age: the router
        ("c_ap.png", "AP", "3", "F", "S3"),       # group 0: no model (skipped in training)
        ("d.png", "", "9", "M", "S4"),            # no projection and no --projection
        ("e.png", "oblique", "9", "M", "S4"),     # not a modelled projection
        ("missing.png", "AP", "9", "M", "S5"),    # listed but not there
    ]
    for i, (name, *_rest) in enumerate(rows[:-1]):
        write_png16(images / name, seed=i)
    csv = tmp_path / "worklist.csv"
    pd.DataFrame(rows, columns=["path", "projection", "age", "sex", "study_id"]).assign(
        path=lambda f: "worklist_images/" + f["path"]).to_csv(csv, index=False)

    table, skipped = run(predict, [csv], models, tmp_path / "out")
    images_rows = table[table["level"] == "image"].set_index("input_path")
    check_image_rows(images_rows.reset_index())
    names = ["a_ap.png", "a_lat.png", "b_ap.png", "b_lat.png"]
    assert images_rows.index.tolist() == [f"worklist_images/{name}" for name in names]
    assert (images_rows["projection_source"] == "csv").all()
    assert images_rows["projection"].tolist() == ["AP", "Lat", "AP", "Lat"]
    assert images_rows["age_group"].tolist() == [1, 1, 2, 1]
    assert images_rows["age_group_source"].tolist() == ["given", "given", "given", "predicted"]

    reasons = dict(zip(skipped["input_path"].map(lambda p: Path(p).name), skipped["reason"]))
    assert reasons == {"c_ap.png": "no fracture model for the group", "d.png": "no projection",
                       "e.png": "projection not AP or Lat", "missing.png": "file not found"}
    detail = skipped.set_index("reason").loc["no fracture model for the group", "detail"]
    assert "skipped in training: train has only no-fracture images" in detail

    # Study rows: the max probability; positive when any image is positive at its own threshold.
    studies = table[table["level"] == "study"].set_index("study_id")
    assert studies.index.tolist() == ["S1", "S2"]
    for study, members in images_rows.groupby("study_id"):
        assert studies.loc[study, "fracture_prob"] == pytest.approx(members["fracture_prob"].max())
        assert studies.loc[study, "fracture_pred"] == int(members["fracture_pred"].max())
        assert studies.loc[study, "n_images"] == 2 and studies.loc[study, "projection"] == "AP+Lat"


def test_given_age_versus_router(predict, models, tmp_path):
    path = write_png16(tmp_path / "wrist.png", seed=3)
    routed, _ = run(predict, [path], models, tmp_path / "routed", "--projection", "AP")
    given, _ = run(predict, [path], models, tmp_path / "given", "--projection", "AP", "--age", "12.5")
    assert routed[["age_group", "age_group_source", "model"]].values.tolist() == [
        [1, "predicted", "fracture/AP/group1/best.pt"]]
    assert given[["age_group", "age_group_source", "model"]].values.tolist() == [
        [2, "given", "fracture/AP/group2/best.pt"]]


def test_dicom_age_is_used_and_flags_only_fill_gaps(predict, models, tmp_path):
    import pydicom
    dataset = pydicom.dcmread(cr_dicom())
    dataset.PatientAge = "012Y"
    dataset.save_as(tmp_path / "aged.dcm")
    table, _ = run(predict, [tmp_path / "aged.dcm"], models, tmp_path / "out", "--age", "7", "--projection", "Lat")
    table = table[table["level"] == "image"]
    assert table[["projection", "projection_source", "age_group", "age_group_source"]].values.tolist() == [
        ["AP", "dicom", 2, "given"]]  # 12 years from the header, not --age 7; AP from the header


def test_nothing_predictable_still_writes_both_files(predict, models, tmp_path, capsys):
    broken = write_corrupt_png(tmp_path / "broken.png")
    table, skipped = run(predict, [broken], models, tmp_path / "out", "--projection", "AP", "--age", "8")
    assert table.columns.tolist() == IMAGE_COLUMNS and table.empty
    assert skipped["reason"].tolist() == ["unreadable image"]
    assert "predicted 0 images; skipped 1 (1 unreadable image)" in capsys.readouterr().out


def test_probability_is_the_training_preprocessing(predict, models, tmp_path):
    path = write_png16(tmp_path / "wrist.png", seed=4, shape=(120, 64))
    table, _ = run(predict, [path], models, tmp_path / "out", "--projection", "Lat", "--age", "8")
    model, checkpoint = common.load_trained_model(models / "fracture" / "Lat" / "group1" / "best.pt")
    square, _ = common.preprocess_image(path, checkpoint["image_size"])
    images = common.prepare_images(torch.from_numpy(square)[None, None], torch.device("cpu"),
                                   train=False, channels_last=False)
    with torch.no_grad():
        expected = torch.sigmoid(model(images)).item()
    assert table["fracture_prob"].item() == pytest.approx(expected, abs=1e-6)


def test_bone_age_and_grad_cam(predict, models, tmp_path):
    first = write_png16(tmp_path / "hands" / "h1.png", seed=1, shape=(100, 80))
    write_png16(tmp_path / "hands" / "h2.png", seed=2, shape=(100, 80))
    csv = tmp_path / "hands.csv"
    csv.write_text("path,sex\nhands/h1.png,M\nhands/h2.png,\n")
    table, skipped = run(predict, [csv], models, tmp_path / "out", "--projection", "AP", "--age", "11",
                         "--boneage", "--cam")
    assert table.columns.tolist() == [*IMAGE_COLUMNS, "bone_age_months", "cam_path"]
    assert table.loc[0, "bone_age_months"] > 0 and table.loc[0, "bone_age_months"] < 240
    assert pd.isna(table.loc[1, "bone_age_months"])  # no sex in the CSV and no --sex
    assert skipped[["reason", "task"]].values.tolist() == [["bone age: no sex", "bone age"]]
    for row in table.itertuples():
        overlay = cv2.imread(str(tmp_path / "out" / row.cam_path))
        assert overlay.shape[1] == 80 and overlay.shape[0] > 100  # original width, caption above
    assert cv2.imread(str(first), cv2.IMREAD_UNCHANGED).shape == (100, 80)


def test_a_view_the_fracture_models_cannot_use_still_gets_its_bone_age(predict, models, tmp_path):
    """An oblique hand is a fracture skip only: its sex is read all the same, for --boneage."""
    write_png16(tmp_path / "hands" / "h1.png", seed=1, shape=(100, 80))
    csv = tmp_path / "hands.csv"
    csv.write_text("path,sex,projection,age\nhands/h1.png,F,oblique,9\n")
    table, skipped = run(predict, [csv], models, tmp_path / "out", "--boneage")
    assert 0 < table.loc[0, "bone_age_months"] < 240 and pd.isna(table.loc[0, "fracture_prob"])
    assert skipped[["reason", "task"]].values.tolist() == [["projection not AP or Lat", "fracture"]]


def test_a_deployed_mean_averages_both_models_at_the_deployed_threshold(predict, models, tmp_path):
    """04 deployed the mean of two models for Lat group 1 (deployed.json): 07's raw probability is
    the mean of their probabilities, decided at the deployment's threshold, reported through its
    map, and the Grad-CAM++ overlay is drawn too."""
    run_dir = tmp_path / "outputs"
    shutil.copytree(models, run_dir)
    calibration = {"method": "platt", "slope": 0.8, "intercept": -0.3, "n": 40, "reason": ""}
    common.write_json({"arm": "mean", "models": ["Lat/group2/best.pt", "Lat/group1/best.pt"], "threshold": 0.47,
                       "thresholds": {"youden": 0.47}, "calibration": calibration},
                      run_dir / "fracture" / "Lat" / "group1" / "deployed.json")
    path = write_png16(tmp_path / "wrist.png", seed=5, shape=(120, 64))
    table, _ = run(predict, [path], run_dir, tmp_path / "out", "--projection", "Lat", "--age", "7", "--cam")
    square, _ = common.preprocess_image(path, SIZE)
    images = common.prepare_images(torch.from_numpy(square)[None, None], torch.device("cpu"), train=False,
                                   channels_last=False)
    with torch.no_grad():
        probs = [torch.sigmoid(common.load_trained_model(run_dir / "fracture" / "Lat" / f"group{g}" / "best.pt")[0]
                               (images)).item() for g in (2, 1)]
    row = table.iloc[0]
    assert row["raw_prob"] == pytest.approx(np.mean(probs), abs=1e-6) and probs[0] != pytest.approx(probs[1])
    assert row["fracture_pred"] == int(np.mean(probs) >= 0.47)
    assert row["fracture_prob"] == pytest.approx(common.apply_calibration([np.mean(probs)], calibration)[0], abs=1e-6)
    assert row["threshold"] == pytest.approx(common.apply_calibration([0.47], calibration)[0])
    assert row["model"] == "fracture/Lat/group2/best.pt+fracture/Lat/group1/best.pt"
    assert (tmp_path / "out" / row["cam_path"]).is_file()


def test_bad_inputs_fail_in_one_line(predict, models, tmp_path):
    with pytest.raises(common.InputError, match="no such folder, CSV or image file"):
        predict.main([str(tmp_path / "nowhere.png"), "--models", str(models)])
    image = write_png16(tmp_path / "wrist.png", seed=0)
    with pytest.raises(common.InputError, match="04_train_fracture_ddp.py"):
        predict.main([str(image), "--models", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    (tmp_path / "bad.csv").write_text("file,age\nwrist.png,3\n")
    with pytest.raises(common.InputError, match="no `image_path`"):
        predict.main([str(tmp_path / "bad.csv"), "--models", str(models), "--out", str(tmp_path / "o")])
    no_boneage = tmp_path / "no_boneage"
    shutil.copytree(models / "fracture", no_boneage / "fracture")
    with pytest.raises(common.InputError, match="05_train_boneage.py"):
        predict.main([str(image), "--models", str(no_boneage), "--boneage", "--out", str(tmp_path / "o")])
