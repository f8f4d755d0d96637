"""07 on DICOM as a PACS sends it: studies from Study Instance UID and laterality, views from the
header, compressed files, and no identifying value in any output file."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from conftest import cr_dicom
from test_predict import models, predict, run  # noqa: F401 -- the shared fixtures of 07's tests

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
