"""07 --dicom-out and --store: results back into the PACS, on pydicom-data's real CR radiographs.

The models are test_predict's cheap ones, given a Platt map here so that the calibrated and the
raw probability differ. One run files an uncompressed and a JPEG 2000 radiograph of one study, a
radiograph of another study, a PNG (a counted skip) and an oblique view (no prediction, nothing
filed); the structure and dciodvfy tests read what it wrote. The Orthanc test starts a real
Orthanc on 127.0.0.1 with its own storage and stores into it.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import common
from test_predict import THRESHOLDS, models, predict, run, write_png16  # noqa: F401 -- 07's fixtures
from test_predict_dicom import IDENTIFYING, _dicom

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("highdicom")
pytest.importorskip("pynetdicom")
data_store = pytest.importorskip("data_store")
STORE = Path(data_store.__file__).parent / "data"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CALIBRATION = {"method": "platt", "slope": 0.8, "intercept": -0.4, "n": 50, "reason": ""}
RAW_THRESHOLD = 0.55  # test_predict's AP group 2 model: age 11 with its edges 5, 10, 15
NO_SOURCE = "DICOM out: no DICOM source to file the result into"


def _source(name: str) -> Path:
    path = STORE / name
    if not path.is_file():
        pytest.skip(f"pydicom-data's {name} is absent")
    return path


@pytest.fixture(scope="module")
def pacs_models(models, tmp_path_factory) -> Path:  # noqa: F811
    """test_predict's models with a Platt map and summary.csv's threshold sources, as 04 leaves them."""
    out = tmp_path_factory.mktemp("pacs_models") / "outputs"
    shutil.copytree(models, out)
    for path in (out / "fracture").glob("*/group*/best.pt"):
        common.save_checkpoint({**common.load_checkpoint(path), "calibration": CALIBRATION}, path)
    trained = pd.DataFrame([{"kind": "model", "projection": projection, "age_group": group, "status": "trained",
                             "reason": "", "threshold_source": "val Youden"} for projection, group in THRESHOLDS])
    summary = pd.read_csv(out / "fracture" / "summary.csv", keep_default_na=False)
    common.write_csv(pd.concat([summary[summary["status"] == "skipped"], trained]), out / "fracture" / "summary.csv")
    return out


@dataclass
class Filed:
    """What one --dicom-out run wrote and said."""
    dicom_out: Path
    table: pd.DataFrame
    skipped: pd.DataFrame
    sources: dict[str, Path]
    log: str


def _worklist(folder: Path) -> dict[str, Path]:
    """The real radiographs (RG3: one study, uncompressed and JPEG 2000; RG1: another study, no
    laterality), an oblique copy of RG3 (a fracture skip: not AP or Lat; it still gets its bone
    age), a truncated DICOM (skipped: unreadable) and a PNG."""
    folder.mkdir(parents=True)
    sources = {name: Path(shutil.copy(_source(name), folder / name))
               for name in ("RG3_UNCR.dcm", "RG3_J2KR.dcm", "RG1_J2KR.dcm")}
    oblique = pydicom.dcmread(_source("RG3_UNCR.dcm"))
    oblique.ViewPosition = "OBL"
    oblique.SOPInstanceUID = oblique.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    oblique.save_as(folder / "oblique.dcm")
    (folder / "broken.dcm").write_bytes(sources["RG3_UNCR.dcm"].read_bytes()[:4000])
    write_png16(folder / "hand.png", seed=1)
    return sources


FLAGS = ["--age", "11", "--projection", "AP", "--sex", "M", "--boneage"]


@pytest.fixture(scope="module")
def filed(predict, pacs_models, tmp_path_factory) -> Filed:  # noqa: F811
    base = tmp_path_factory.mktemp("filed")
    sources = _worklist(base / "worklist")
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        table, skipped = run(predict, [base / "worklist"], pacs_models, base / "out", *FLAGS,
                             "--dicom-out", str(base / "pacs_out"))
    return Filed(base / "pacs_out", table, skipped, sources, log.getvalue())


def _items(dataset):
    """Every content item of an SR tree, depth first."""
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from _items(item)


def _numbers(dataset) -> dict[str, float]:
    return {item.ConceptNameCodeSequence[0].CodeValue: float(item.MeasuredValueSequence[0].NumericValue)
            for item in _items(dataset) if item.ValueType == "NUM"}


def _fracture_findings(dataset) -> list[str]:
    return [item.ConceptCodeSequence[0].CodeMeaning for item in _items(dataset)
            if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeValue == "72704001"]


def _referenced(dataset) -> set[str]:
    return {str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID) for item in _items(dataset)
            if item.ValueType == "IMAGE"}


def _decision(pred) -> str:
    return "Present" if int(pred) == 1 else "Absent"


def test_sr_and_sc_are_filed_into_the_source_study(filed, pacs_models):
    manifest = pd.read_csv(filed.dicom_out / "manifest.csv", dtype=str, keep_default_na=False)
    filed_images = manifest[manifest["level"] == "image"].set_index("input_path")
    predictions = filed.table[filed.table["level"] == "image"].set_index("input_path")
    assert sorted(Path(p).name for p in filed_images.index) == sorted([*filed.sources, "oblique.dcm"])
    # Exactly the files the manifest names: no temporary file of an atomic write is left over.
    named = [*manifest["sr_file"], *filter(None, manifest["sc_file"])]
    assert sorted(path.name for path in filed.dicom_out.iterdir()) == sorted([*named, "manifest.csv"])

    # The oblique view has no fracture result, only its bone age: an SR of that alone, no overlay.
    oblique_path = next(p for p in filed_images.index if p.endswith("oblique.dcm"))
    oblique_sr = pydicom.dcmread(filed.dicom_out / filed_images.loc[oblique_path, "sr_file"])
    assert filed_images.loc[oblique_path, "sc_file"] == "" and _fracture_findings(oblique_sr) == []
    assert _numbers(oblique_sr) == {"bone-age": pytest.approx(predictions.loc[oblique_path, "bone_age_months"])}

    series = {}
    for input_path, row in filed_images.drop(index=oblique_path).iterrows():
        source = pydicom.dcmread(filed.sources[Path(input_path).name], stop_before_pixels=True)
        sr, sc = pydicom.dcmread(filed.dicom_out / row["sr_file"]), pydicom.dcmread(filed.dicom_out / row["sc_file"])
        assert (sr.SOPClassUID, sr.Modality, sc.SOPClassUID, sc.Modality) == (
            COMPREHENSIVE_3D_SR, "SR", SECONDARY_CAPTURE, "OT")
        for written in (sr, sc):  # in the source's study and record, as new series and instances
            assert written.StudyInstanceUID == source.StudyInstanceUID
            assert (written.PatientID, written.PatientName, written.AccessionNumber) == (
                source.PatientID, source.PatientName, source.AccessionNumber)
            assert written.SeriesInstanceUID != source.SeriesInstanceUID
            assert written.SOPInstanceUID != source.SOPInstanceUID
            assert "not for diagnostic use" in written.SeriesDescription
        series.setdefault(str(source.StudyInstanceUID), set()).update({sr.SeriesInstanceUID, sc.SeriesInstanceUID})
        # The SR's tree and its evidence reference the source image.
        assert _referenced(sr) == {str(source.SOPInstanceUID)}
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        # Its values are predictions.csv's.
        expected, numbers = predictions.loc[input_path], _numbers(sr)
        assert numbers["fracture-prob"] == pytest.approx(expected["fracture_prob"], rel=1e-9)
        assert numbers["raw-prob"] == pytest.approx(expected["raw_prob"], rel=1e-9)
        assert numbers["fracture-prob"] != pytest.approx(numbers["raw-prob"])  # the Platt map applied
        assert numbers["threshold"] == pytest.approx(expected["threshold"], rel=1e-9)
        assert numbers["raw-threshold"] == RAW_THRESHOLD
        assert numbers["bone-age"] == pytest.approx(expected["bone_age_months"])
        assert _fracture_findings(sr) == [_decision(expected["fracture_pred"])]
        texts = {str(item.TextValue) for item in _items(sr) if item.ValueType == "TEXT"}
        model_hash = hashlib.sha256((pacs_models / expected["model"]).read_bytes()).hexdigest()
        assert {"resnet10t", f"model sha256 {model_hash}", f"model file {expected['model']}"} <= texts
        assert any("val Youden" in text and f"{RAW_THRESHOLD:.4f}" in text for text in texts)
        # The SC: the RGB overlay, the source's shape shrunk to 1024 at most, a caption band on top.
        pixels = sc.pixel_array
        assert sc.PhotometricInterpretation == "RGB" and pixels.dtype == np.uint8 and pixels.shape[2] == 3
        shrink = min(1.0, common.MAX_OVERLAY_SIDE / max(source.Rows, source.Columns))
        assert pixels.shape[1] == round(source.Columns * shrink) and pixels.shape[0] > source.Rows * shrink
        assert sc.BurnedInAnnotation == "YES"
        band = pixels[:20].reshape(-1, 3)
        assert (band == 0).all(axis=1).mean() > 0.5 and (band > 200).all(axis=1).any()  # white on black
        assert (pixels[-pixels.shape[0] // 2:, :, 0] != pixels[-pixels.shape[0] // 2:, :, 2]).any()  # colour map
    # One new SR series and one new SC series per study: RG3's two images share them.
    assert sorted(len(uids) for uids in series.values()) == [2, 2]

    # The study SR: predictions.csv's study row, referencing both images of RG3's study.
    rg3 = {name: pydicom.dcmread(filed.sources[name], stop_before_pixels=True) for name in ("RG3_UNCR.dcm",
                                                                                             "RG3_J2KR.dcm")}
    study_id = predictions.loc[[p for p in predictions.index if p.endswith("RG3_UNCR.dcm")][0], "study_id"]
    (study_file,) = manifest.loc[(manifest["level"] == "study") & (manifest["study_id"] == study_id), "sr_file"]
    study_sr = pydicom.dcmread(filed.dicom_out / study_file)
    expected = filed.table[(filed.table["level"] == "study") & (filed.table["study_id"] == study_id)].iloc[0]
    assert study_sr.StudyInstanceUID == rg3["RG3_UNCR.dcm"].StudyInstanceUID
    assert _referenced(study_sr) == {str(header.SOPInstanceUID) for header in rg3.values()}
    assert _numbers(study_sr)["study-prob"] == pytest.approx(expected["fracture_prob"], rel=1e-9)
    assert _fracture_findings(study_sr)[0] == _decision(expected["fracture_pred"])

    # The PNG keeps its prediction and is a counted skip for DIR only; the unreadable DICOM files nothing.
    reasons = set(zip(filed.skipped["input_path"].map(lambda p: Path(p).name), filed.skipped["reason"]))
    assert {("hand.png", NO_SOURCE), ("oblique.dcm", "projection not AP or Lat"),
            ("broken.dcm", "unreadable image")} <= reasons
    assert [name for name, reason in reasons if reason.startswith("DICOM out")] == ["hand.png"]
    assert any(p.endswith("hand.png") for p in predictions.index)
    (summary,) = [line for line in filed.log.splitlines() if line.startswith("07: predicted")]
    assert f"1 {NO_SOURCE}" in summary


def test_dciodvfy_finds_no_error(filed):
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy is None:
        pytest.skip("dciodvfy is not installed (Debian: apt-get install dicom3tools)")
    written = sorted(filed.dicom_out.glob("*.dcm"))
    assert {pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID for p in written} == {
        COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE}
    for path in written:
        result = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
        report = result.stdout + result.stderr
        assert not [line for line in report.splitlines() if "Error" in line], f"{path.name}:\n{report}"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Orthanc:
    """A real Orthanc on 127.0.0.1 with its own storage and configuration, for one test."""

    def __init__(self, folder: Path, binary: str):
        self.http, self.dicom = _free_port(), _free_port()
        config = {
            "Name": "pedwrist-test", "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"), "HttpPort": self.http, "DicomPort": self.dicom,
            "DicomAet": "ORTHANC", "DicomCheckCalledAet": True, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "Plugins": [], "SaveJobs": False,
            # Orthanc 1.10 cannot bind to one address: the DICOM port listens on every
            # interface, so only the pipeline's AE title from 127.0.0.1 may store or echo.
            "DicomAlwaysAllowStore": False, "DicomAlwaysAllowEcho": False, "DicomCheckModalityHost": True,
            "DicomModalities": {"pipeline": ["PEDWRIST", "127.0.0.1", 104]},
            "HttpThreadsCount": 4, "DicomThreadsCount": 2, "ConcurrentJobs": 1}
        folder.mkdir(parents=True)
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.log = open(folder / "orthanc.log", "wb")
        self.process = subprocess.Popen([binary, str(folder / "orthanc.json")], stdout=self.log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.get("/system")
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"Orthanc did not start: {(folder / 'orthanc.log').read_text()[-2000:]}")
                time.sleep(0.2)

    def get(self, path: str, data: bytes | None = None):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", data=data, timeout=10) as answer:
            return json.loads(answer.read())

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


@pytest.fixture
def orthanc(tmp_path):
    # Debian installs Orthanc in /usr/sbin, which is not on every user's PATH.
    binary = shutil.which("Orthanc", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"]))
    if binary is None:
        pytest.skip("Orthanc is not installed (Debian: apt-get install orthanc)")
    server = Orthanc(tmp_path / "orthanc", binary)
    try:
        yield server
    finally:
        server.stop()


def test_store_into_a_real_orthanc(predict, pacs_models, orthanc, tmp_path, capsys):  # noqa: F811
    sources = _worklist(tmp_path / "worklist")
    for path in sources.values():  # the PACS already holds the radiographs
        orthanc.get("/instances", data=path.read_bytes())
    dicom_out = tmp_path / "pacs_out"
    run(predict, [tmp_path / "worklist"], pacs_models, tmp_path / "out", *FLAGS, "--dicom-out", str(dicom_out),
        "--store", f"127.0.0.1:{orthanc.dicom}:ORTHANC")
    log = capsys.readouterr().out

    written = {path.name: pydicom.dcmread(path, stop_before_pixels=True) for path in dicom_out.glob("*.dcm")}
    report = pd.read_csv(dicom_out / "store_report.csv", keep_default_na=False)
    assert sorted(report["file"]) == sorted(written) and (report["status"] == "stored").all()
    assert f"stored {len(written)} files into 127.0.0.1:{orthanc.dicom}:ORTHANC" in log
    for name in written:
        assert f"07: stored {name}" in log
    radiographs = [pydicom.dcmread(path, stop_before_pixels=True) for path in sources.values()]
    for study_uid in {str(header.StudyInstanceUID) for header in written.values()}:
        (study,) = orthanc.get("/tools/lookup", data=study_uid.encode())
        assert study["Type"] == "Study"
        listed = orthanc.get(f"/studies/{study['ID']}/instances")
        instances = {item["MainDicomTags"]["SOPInstanceUID"] for item in listed}
        expected = {str(header.SOPInstanceUID) for header in [*written.values(), *radiographs]
                    if header.StudyInstanceUID == study_uid}
        assert instances == expected  # the sources, their SRs and SCs: one study
        modalities = [item["MainDicomTags"]["Modality"] for item in orthanc.get(f"/studies/{study['ID']}/series")]
        assert sorted(set(modalities)) == ["CR", "OT", "SR"]  # one new SR and one new SC series
        assert modalities.count("SR") == modalities.count("OT") == 1

    # A calling AE title Orthanc does not know: a refused association, one line, files kept.
    with pytest.raises(common.InputError, match="refused the association") as refused:
        predict.main([str(tmp_path / "worklist"), "--models", str(pacs_models), "--out", str(tmp_path / "out2"),
                      "--device", "cpu", *FLAGS, "--dicom-out", str(tmp_path / "pacs_out2"),
                      "--store", f"127.0.0.1:{orthanc.dicom}:ORTHANC", "--calling-aet", "STRANGER"])
    assert "\n" not in str(refused.value) and "the files stay in" in str(refused.value)
    assert len(list((tmp_path / "pacs_out2").glob("*.dcm"))) == len(written)


def test_store_errors_are_one_line_and_keep_the_files(predict, pacs_models, tmp_path):  # noqa: F811
    scan = shutil.copy(_source("RG3_UNCR.dcm"), tmp_path / "scan.dcm")
    base = [scan, "--models", str(pacs_models), "--out", str(tmp_path / "out"), "--device", "cpu", "--age", "11"]
    base = [str(item) for item in base]
    for flags, message in [
            (["--store", "127.0.0.1:104:PACS"], "--store sends what --dicom-out writes; add --dicom-out DIR"),
            (["--dicom-out", str(tmp_path / "d"), "--store", "pacs:104"], "give HOST:PORT:AET"),
            (["--dicom-out", str(tmp_path / "d"), "--store", "pacs:99999:PACS"], "not a number from 1 to 65535"),
            (["--dicom-out", str(tmp_path / "d"), "--store", "pacs:104:"], "an AE title is 1 to 16"),
            (["--dicom-out", str(tmp_path / "d"), "--calling-aet", "A" * 17], "an AE title is 1 to 16"),
            (["--dicom-out", str(tmp_path / "out" / "pacs")], "inside --out"),
    ]:
        with pytest.raises(common.InputError, match=message.replace("-", r"\-")) as error:
            predict.main([*base, *flags])
        assert "\n" not in str(error.value)

    # Nothing listening on the port: one line naming the target; the files stay in DIR.
    port, dicom_out = _free_port(), tmp_path / "pacs_out"
    with pytest.raises(common.InputError, match=rf"--store 127.0.0.1:{port}:PACS: no DICOM server answered") as error:
        predict.main([*base, "--dicom-out", str(dicom_out), "--store", f"127.0.0.1:{port}:PACS"])
    assert "\n" not in str(error.value) and "the files stay in" in str(error.value)

    # A server that answers and hangs up before any A-ASSOCIATE-AC, as a busy Orthanc refusing an
    # unknown AE title sometimes does: a refusal, not "no server".
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        hang_up = threading.Thread(target=lambda: server.accept()[0].close(), daemon=True)
        hang_up.start()
        with pytest.raises(common.InputError, match="refused the association") as error:
            predict.main([*base, "--dicom-out", str(dicom_out), "--store", f"127.0.0.1:{server.getsockname()[1]}:PACS"])
        hang_up.join(timeout=10)
    assert "\n" not in str(error.value) and "the files stay in" in str(error.value)
    assert sorted(path.name for path in dicom_out.glob("*.dcm")) == ["00000_sc.dcm", "00000_sr.dcm",
                                                                       "study_000_sr.dcm"]
    assert (tmp_path / "out" / "predictions.csv").is_file()


def test_a_store_that_fails_for_some_files_is_reported(predict, pacs_models, tmp_path):  # noqa: F811
    """A server that refuses the Secondary Captures (status 0xA700): the SRs are stored, the
    report names each file, and the run ends with one line and a non-zero exit."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Comprehensive3DSRStorage, SecondaryCaptureImageStorage
    received = []

    def on_store(event):
        received.append(str(event.dataset.SOPClassUID))
        return 0xA700 if event.dataset.SOPClassUID == SECONDARY_CAPTURE else 0x0000

    server = AE(ae_title="PACS")
    for sop_class in (Comprehensive3DSRStorage, SecondaryCaptureImageStorage):
        server.add_supported_context(sop_class)
    port = _free_port()
    scp = server.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        scan = shutil.copy(_source("RG3_UNCR.dcm"), tmp_path / "scan.dcm")
        dicom_out = tmp_path / "pacs_out"
        with pytest.raises(common.InputError, match=r"1 of 3 files not stored \(see .*store_report.csv\)") as error:
            predict.main([str(scan), "--models", str(pacs_models), "--out", str(tmp_path / "out"), "--device", "cpu",
                          "--age", "11", "--dicom-out", str(dicom_out), "--store", f"127.0.0.1:{port}:PACS"])
    finally:
        scp.shutdown()
    assert "\n" not in str(error.value)
    assert sorted(received) == sorted([COMPREHENSIVE_3D_SR, SECONDARY_CAPTURE, COMPREHENSIVE_3D_SR])
    report = pd.read_csv(dicom_out / "store_report.csv", keep_default_na=False).set_index("file")
    assert report["status"].to_dict() == {"00000_sr.dcm": "stored", "00000_sc.dcm": "failed",
                                          "study_000_sr.dcm": "stored"}
    assert report.loc["00000_sc.dcm", "detail"] == "status 0xA700"
    assert len(list(dicom_out.glob("*.dcm"))) == 3


def test_identifiers_only_inside_dicom_out(predict, pacs_models, tmp_path, capsys, recwarn):  # noqa: F811
    """The SR and SC carry the patient's identifiers by design; every other output, file name and
    log line stays free of them, as without --dicom-out."""
    folder = tmp_path / "pacs"
    folder.mkdir()
    study_uid = pydicom.uid.generate_uid()
    _dicom(folder / "IM0001.dcm", study_uid, "R", view="AP")
    second = pydicom.dcmread(_dicom(folder / "IM0002.dcm", study_uid, "R", view="AP", compress=True))
    second.ReferringPhysicianName = "Whoever"  # one part: highdicom warns, quoting the name
    second.save_as(folder / "IM0002.dcm")
    uids = [study_uid, *(str(pydicom.dcmread(p, stop_before_pixels=True)[k].value) for p in sorted(folder.iterdir())
                         for k in ("SeriesInstanceUID", "SOPInstanceUID"))]
    out, dicom_out = tmp_path / "out", tmp_path / "pacs_out"
    run(predict, [folder], pacs_models, out, "--age", "11", "--cam", "--dicom-out", str(dicom_out))
    log = capsys.readouterr()

    written = [path for path in out.rglob("*") if path.is_file()]
    assert {"predictions.csv", "skipped.csv", "config.json"} <= {path.name for path in written}
    for path in written:
        content = path.read_bytes()
        for value in [*IDENTIFYING.values(), *uids, "Doe", "20120304", "Whoever"]:
            assert value.encode() not in content, f"{value} in {path.name}"
            assert value not in path.name
    shown = log.out + log.err + "".join(str(warning.message) for warning in recwarn)
    for value in [*IDENTIFYING.values(), *uids, "Whoever"]:
        assert value not in shown, f"{value} in the log"
    # ... and inside DIR they are there, on purpose.
    sr = pydicom.dcmread(dicom_out / "00000_sr.dcm")
    assert (str(sr.PatientName), sr.PatientID, sr.StudyInstanceUID) == ("Doe^Jane", "PID-4711-XYZ", study_uid)
