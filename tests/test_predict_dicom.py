"""07 on DICOM as a PACS sends it: studies from Study Instance UID and laterality, views from the
header, compressed files, and no identifying value in any output file."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from conftest import cr_dicom, load_stage
from test_predict import models, predict, run  # noqa: F401 -- the shared fixtures of 07's tests

predict_stage = load_stage("07_predict")

pydicom = pytest.importorskip("pydicom")
IDENTIFYING = {"PatientName": "Doe^Jane", "PatientID": "PID-4711-XYZ", "PatientBirthDate": "20120304",
               "AccessionNumber": "ACC-99123", "InstitutionName": "St Example Hospital",
               "ReferringPhysicianName": "Dr^Who", "OtherPatientIDs": "ALT-5566"}


def _dicom(path: Path, study_uid: str, laterality: str, view: str | None = None, view_code=None,
           compress: bool = False) -> Path:
    from pydicom.dataset import Dataset
    dataset = pydicom.dcmread(cr_dicom())
    for keyword, value in IDENTIFYING.items():
        setattr(dataset, keyword, value)
    dataset.StudyInstanceUID = study_uid
    dataset.SeriesInstanceUID = pydicom.uid.generate_uid()
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    dataset.ImageLaterality = laterality
    if view is None:
        del dataset.ViewPosition
    else:
        dataset.ViewPosition = view
    if view_code is not None:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = view_code
        dataset.ViewCodeSequence = [item]
    if compress:
        dataset.compress(pydicom.uid.RLELossless)
    dataset.save_as(path)
    return path


def test_dicom_studies_views_and_nothing_identifying(predict, models, tmp_path):  # noqa: F811
    folder = tmp_path / "pacs"
    folder.mkdir()
    first, second = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    _dicom(folder / "IM0001", first, "R", view="AP")                                    # no extension
    _dicom(folder / "IM0002.dcm", first, "R", view_code=("399067008", "SCT", "lateral"))
    _dicom(folder / "IM0003.dcm", first, "L", view="PA")                                # other wrist
    _dicom(folder / "IM0004.dcm", second, "R", view="AP", compress=True)                # RLE
    _dicom(folder / "IM0005.dcm", second, "R")                                          # no view
    _dicom(folder / "IM0006.dcm", second, "R", view_code=("399099002", "SCT", "lateral-medial oblique"))
    out = tmp_path / "out"
    table, skipped = run(predict, [folder], models, out, "--age", "11", "--cam")

    images, studies = table[table["level"] == "image"], table[table["level"] == "study"]
    by_name = images.set_index(images["input_path"].map(lambda p: Path(p).name))
    assert by_name["projection"].to_dict() == {"IM0001": "AP", "IM0002.dcm": "Lat", "IM0003.dcm": "AP",
                                               "IM0004.dcm": "AP"}
    # One study per (Study Instance UID, laterality): the left wrist of the same visit is its own.
    assert by_name.loc["IM0001", "study_id"] == by_name.loc["IM0002.dcm", "study_id"] == by_name.loc["IM0003.dcm", "study_id"]
    assert by_name.loc["IM0004.dcm", "study_id"] != by_name.loc["IM0001", "study_id"]
    summary = studies.set_index(["study_id", "laterality"])[["n_images", "projection"]]
    assert sorted(summary.values.tolist()) == [[1, "AP"], [1, "AP"], [2, "AP+Lat"]]
    pair = images[images["input_path"].str.contains("IM000[12]")]
    row = studies[(studies["study_id"] == pair["study_id"].iloc[0]) & (studies["laterality"] == "R")].iloc[0]
    assert row["fracture_prob"] == pytest.approx(pair["fracture_prob"].max())
    assert row["fracture_pred"] == pair["fracture_pred"].max()
    reasons = skipped.set_index(skipped["input_path"].map(lambda p: Path(p).name))["reason"].to_dict()
    assert reasons == {"IM0005.dcm": "no projection", "IM0006.dcm": "projection not AP or Lat"}

    # Every byte of every output file (CSV, JSON, Grad-CAM PNGs) is free of the header's identity.
    written = [path for path in out.rglob("*") if path.is_file()]
    assert any(path.suffix == ".png" for path in written)
    uids = [first, second] + [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                              for p in sorted(folder.iterdir())]
    for path in written:
        content = path.read_bytes()
        for value in [*IDENTIFYING.values(), *uids, "Doe", "20120304"]:
            assert value.encode() not in content, f"{value} in {path.name}"



def test_uid_named_files_and_folders_are_written_as_hashes(predict, models, tmp_path, capsys, monkeypatch):  # noqa: F811
    """A PACS export names files by SOP Instance UID and folders by Study/Series UID: no UID of a
    path (nor a CSV study_id that is one) reaches an output file, a file name or the log in clear."""
    import shutil
    import sys
    folder_uid, file_uid, broken_uid, copy_uid, missing_uid, study_uid = (
        "1.2.840.10008.5.1.4.1", "1.2.3.4.5.6", "1.2.3.4.5.7", "1.2.3.4.5.8", "1.2.3.4.5.99",
        "1.2.826.0.1.3680043.2.1125.1")
    series = tmp_path / "pacs" / folder_uid
    series.mkdir(parents=True)
    shutil.copy(cr_dicom(), series / f"{file_uid}.dcm")
    (series / f"{broken_uid}.dcm").write_bytes(b"DICM but not really" * 10)           # unreadable
    (tmp_path / "copy").mkdir()
    shutil.copy(cr_dicom(), tmp_path / "copy" / f"{copy_uid}.dcm")
    pd.DataFrame({"image_path": [f"copy/{copy_uid}.dcm", f"copy/{missing_uid}.dcm"],  # the second: not found
                  "study_id": [study_uid, study_uid]}).to_csv(tmp_path / "list.csv", index=False)
    out = tmp_path / "out"
    argv = [str(series), str(tmp_path / "list.csv"), "--age", "11", "--cam"]
    monkeypatch.setattr(sys, "argv", ["07_predict.py", *argv])  # what config.json records as the command
    table, skipped = run(predict, argv[:2], models, out, *argv[2:])
    log = capsys.readouterr()

    header = pydicom.dcmread(cr_dicom(), stop_before_pixels=True)
    uids = [folder_uid, file_uid, broken_uid, copy_uid, missing_uid, study_uid,
            *(str(header[k].value) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if k in header)]
    written = [path for path in out.rglob("*") if path.is_file()]
    assert {path.name for path in written} >= {"predictions.csv", "skipped.csv", "config.json"}
    assert len([path for path in written if path.parent.name == "gradcam"]) == 2
    for path in written:
        content = path.read_bytes()
        for uid in uids:
            assert uid not in path.relative_to(out).as_posix(), f"{uid} in the name {path.name}"
            assert uid.encode() not in content, f"{uid} in {path.name}"
    for uid in uids:
        assert uid not in log.out and uid not in log.err, f"{uid} in the log"

    # Masked, not dropped: one UID is one name in the run, and each output still tells the files apart.
    hashed = r"uid-[0-9a-f]{16}"
    images = table[table["level"] == "image"].set_index("input_path")
    (from_folder,) = [path for path in images.index if "/pacs/" in path]
    folder_name = re.fullmatch(rf".*/pacs/({hashed})/{hashed}\.dcm", from_folder).group(1)
    (from_csv,) = [path for path in images.index if path.startswith("copy/")]
    assert re.fullmatch(rf"copy/{hashed}\.dcm", from_csv) and from_csv != f"copy/{Path(from_folder).name}"
    assert images.loc[from_folder, "study_id"].startswith("S")       # the header's keyed study hash
    assert re.fullmatch(hashed, images.loc[from_csv, "study_id"])     # the CSV's UID study_id, masked
    assert images.loc[from_folder, "fracture_prob"] == pytest.approx(images.loc[from_csv, "fracture_prob"])
    for path in images.index:
        assert re.fullmatch(rf"gradcam/\d{{5}}_{hashed}_p[0-9.]+\.png", images.loc[path, "cam_path"])
    reasons = dict(zip(skipped["reason"], skipped["input_path"]))
    assert re.fullmatch(rf".*/pacs/{folder_name}/{hashed}\.dcm", reasons["unreadable image"])
    assert re.fullmatch(rf"copy/{hashed}\.dcm", reasons["file not found"])
    (detail,) = skipped.loc[skipped["reason"] == "file not found", "detail"]
    assert re.fullmatch(rf".*/copy/{hashed}\.dcm", detail)  # the full path read, masked too
    config = (out / "config.json").read_text()
    assert f"pacs/{folder_name}" in config and "list.csv" in config  # the inputs given, masked alike
    assert f"{folder_name}/uid-" in log.out  # the skips are logged by their masked paths


def test_hide_uids_masks_uid_components_only():
    """UID folders and files (any suffix, any case) are hashed, one name per UID and run; numbers
    that are not UIDs (versions, probabilities, 3-part codes) stay readable."""
    salt, other_salt = b"k" * 16, b"j" * 16
    hidden = predict_stage.hide_uids("/pacs/1.2.840.10008.5.1.4.1/1.2.3.4.5.6.dcm 'x/1.2.3.4.5.6.DCM': 2.25.1.1.dicom",
                                     salt)
    names = re.findall(r"uid-[0-9a-f]{16}", hidden)
    assert len(names) == 4 and names[1] == names[2] != names[0]
    assert re.fullmatch(r"/pacs/uid-\w+/uid-\w+\.dcm 'x/uid-\w+\.DCM': uid-\w+\.dicom", hidden)
    assert predict_stage.hide_uids("1.2.3.4.5.6", other_salt) != names[1]  # the key is the run's
    kept = "IM0001.dcm p=0.53 code 1.2.3 opencv 4.12.0.88 part_1.2.3.4.5 /data/2024.01.15/x.png"
    assert predict_stage.hide_uids(kept, salt) == kept
