"""data/make_demo.py: the demo datasets look like the published ones, are deterministic and cheap to rerun.

One small demo (60 wrist patients, 60 hands) is generated once for the module; the label rates that a
small demo cannot show reliably (metal, oblique, comma-joined AO codes, every age bin) are checked on
the metadata tables alone at the default size, which takes well under a second.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from conftest import load_make_demo

SMALL = ["--wrist-patients", "60", "--boneage-images", "60", "--seed", "0"]
FILESTEM = re.compile(r"^(\d{4})_(\d{10})_(\d{2})_WRI-([LR])([123])_([MFO])(\d{3})$")


@pytest.fixture(scope="module")
def make_demo():
    return load_make_demo()


@pytest.fixture(scope="module")
def demo(make_demo, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    make_demo.main(["--out", str(out), "--workers", "2", *SMALL])
    return out


@pytest.fixture(scope="module")
def wrist(demo) -> pd.DataFrame:
    return pd.read_csv(demo / "grazpedwri" / "dataset.csv", encoding="utf-8-sig", dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def default_size_table(make_demo) -> pd.DataFrame:
    """The wrist metadata of a default-size demo, without drawing any image."""
    return make_demo.build_wrist_table(900, np.random.default_rng([0, 0]))


def test_wrist_csv_has_the_published_columns_bom_and_crlf(demo, make_demo):
    raw = (demo / "grazpedwri" / "dataset.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf"), "the published dataset.csv starts with a UTF-8 byte-order mark"
    header = raw[3:].split(b"\r\n", 1)[0].decode()
    assert header.split(",") == make_demo.GRAZ_COLUMNS
    assert header.split(",")[:3] == ["filestem", "patient_id", "study_number"] and len(header.split(",")) == 17
    assert raw.count(b"\r\n") == raw.count(b"\n"), "the published file uses CRLF line endings"


def test_filestem_encodes_the_row(wrist):
    for row in wrist.itertuples():
        match = FILESTEM.match(row.filestem)
        assert match, row.filestem
        patient, timehash, study, side, projection, gender, age = match.groups()
        assert (int(patient), int(timehash), int(study)) == (int(row.patient_id), int(row.timehash), int(row.study_number))
        assert (side, projection, gender) == (row.laterality, row.projection, row.gender)
        assert int(age) == int(float(row.age))
    assert wrist.timehash.is_unique and wrist.filestem.is_unique


def test_values_are_formatted_like_the_real_file(wrist):
    for column in ["initial_exam", "cast", "diagnosis_uncertain", "osteopenia", "fracture_visible", "metal"]:
        assert set(wrist[column]) <= {"", "1"}, column
    assert wrist.age.str.fullmatch(r"\d{1,2}(\.[1-9])?").all(), "one decimal, whole years without '.0'"
    ages = wrist.age.astype(float)
    assert ages.between(0.0, 19.0).all()
    assert set(wrist.pixel_spacing) <= {"0.143", "0.144"}
    assert set(wrist.device_manufacturer) <= {"Siemens", "Agfa"}
    assert set(wrist.gender) <= {"M", "F", "O"} and set(wrist.laterality) == {"L", "R"}
    normal_patients = wrist.groupby("patient_id").fracture_visible.apply(lambda flags: (flags == "").all())
    normal_rows = wrist.patient_id.isin(normal_patients[normal_patients].index)
    assert (wrist.ao_classification[normal_rows] == "").all(), "AO codes belong to fractures"


def test_every_row_has_its_image_spread_over_four_parts(demo, wrist):
    root = demo / "grazpedwri"
    images = {path.stem: path.parent.name for path in root.rglob("*.png")}
    assert set(images) == set(wrist.filestem)
    assert set(images.values()) == {"images_part1", "images_part2", "images_part3", "images_part4"}


def test_wrist_images_are_16_bit_portrait_and_vary_in_size(demo, wrist):
    shapes = []
    for path in sorted((demo / "grazpedwri").rglob("*.png"))[:12]:
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert image.dtype == np.uint16 and image.ndim == 2, path.name
        assert int(image.max()) - int(image.min()) > 20_000, "uses a wide part of the 16-bit range, not 0-255"
        assert image.min() >= 4_000, "raw values carry an offset, like a detector"
        assert 1.7 < image.shape[0] / image.shape[1] < 2.3, "portrait, about 2:1"
        shapes.append(image.shape)
    assert len(set(shapes)) > 3, "sizes vary"


def test_patients_have_several_images_and_studies_pair_ap_with_lat(wrist):
    per_patient = wrist.groupby("patient_id").size()
    assert 2.5 < per_patient.mean() < 4.5 and per_patient.max() >= 4
    assert (wrist.groupby("patient_id").study_number.nunique() > 1).any(), "some patients have follow-up studies"
    studies = wrist.groupby(["patient_id", "study_number"])
    pairs = studies.projection.apply(lambda p: {"1", "2"} <= set(p))
    assert pairs.mean() > 0.75, "a study is typically one AP and one Lat image"
    assert (studies.laterality.nunique() == 1).mean() > 0.95, "both views of a study show the same wrist"
    ages = wrist.assign(age=wrist.age.astype(float)).groupby(["patient_id", "study_number"]).age.first()
    assert (ages.groupby(level=0).diff().dropna() >= 0).all(), "age never decreases over later studies"


def test_fracture_prevalence_is_about_two_thirds(wrist):
    assert 0.5 < (wrist.fracture_visible == "1").mean() < 0.85


def test_default_size_labels_look_like_the_real_file(default_size_table):
    table = default_size_table
    fracture = table.fracture_visible == "1"
    assert 2_600 < len(table) < 3_400 and table.patient_id.nunique() == 900
    assert 0.60 < fracture.mean() < 0.74  # real 0.667
    assert 0.015 < (table.metal == "1").mean() < 0.07  # real 0.035
    assert 0.20 < (table.cast == "1").mean() < 0.36  # real 0.284
    assert 0.05 < (table.osteopenia == "1").mean() < 0.20  # real 0.122
    assert (table.diagnosis_uncertain == "1").sum() > 20
    assert 3 <= (table.projection == "3").sum() <= 40  # real 0.46%
    assert 10.0 < table.age.astype(float).mean() < 11.8  # real 10.9
    assert table.ao_classification.str.contains("; ").mean() > 0.15  # real 27% of rows
    assert table.ao_classification.str.contains(", ").sum() >= 2  # real: 3 rows joined by commas
    assert ((table.ao_classification != "") & ~fracture).any(), "an AO code without a visible fracture"
    codes = table.ao_classification[table.ao_classification != ""].str.split(r"[;,]\s*", regex=True).explode()
    assert codes.str.fullmatch(r"2[23][ru]?-[EMD]/[\d.]+|72B\([bc]\)").all()
    assert (table.gender == "O").sum() >= 1 and (table.device_manufacturer == "Agfa").any()
    # The split stage stratifies its test set by 20 one-year bins x fracture, per projection.
    for projection in ("1", "2"):
        rows = table[table.projection == projection]
        cells = rows.groupby([rows.age.astype(float).astype(int).clip(0, 19), rows.fracture_visible == "1"]).size()
        assert len(cells) == 40 and cells.min() >= 3, f"projection {projection}: {cells[cells < 3].to_dict()}"


def test_boneage_csv_and_images(demo):
    root = demo / "rsna_boneage"
    raw = (root / "boneage-training-dataset.csv").read_bytes()
    assert raw.startswith(b"id,boneage,male\n")
    table = pd.read_csv(root / "boneage-training-dataset.csv", dtype={"male": str})
    assert list(table.columns) == ["id", "boneage", "male"] and len(table) == 60
    assert set(table.male) == {"True", "False"}
    assert table.boneage.between(1, 228).all() and table.id.is_unique
    assert {path.stem for path in (root / "boneage-training-dataset").glob("*.png")} == set(table.id.astype(str))
    image = cv2.imread(str(root / "boneage-training-dataset" / f"{table.id[0]}.png"), cv2.IMREAD_UNCHANGED)
    assert image.dtype == np.uint8 and image.ndim == 2 and all(190 <= side <= 270 for side in image.shape)


def test_same_seed_gives_identical_files_whatever_the_worker_count(make_demo, demo, tmp_path):
    make_demo.main(["--out", str(tmp_path), "--workers", "1", *SMALL])
    for csv in ["grazpedwri/dataset.csv", "rsna_boneage/boneage-training-dataset.csv"]:
        assert (tmp_path / csv).read_bytes() == (demo / csv).read_bytes(), csv
    for path in sorted((demo / "grazpedwri").rglob("*.png"))[:5] + sorted((demo / "rsna_boneage").rglob("*.png"))[:5]:
        twin = tmp_path / path.relative_to(demo)
        assert np.array_equal(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), cv2.imread(str(twin), cv2.IMREAD_UNCHANGED))


def test_another_seed_gives_other_data(make_demo):
    first = make_demo.build_wrist_table(60, np.random.default_rng([0, 0]))
    second = make_demo.build_wrist_table(60, np.random.default_rng([1, 0]))
    assert not first.filestem.equals(second.filestem)


def test_rerun_with_the_same_settings_is_fast_and_touches_nothing(make_demo, demo, capsys):
    files = [demo / "grazpedwri" / "dataset.csv", demo / ".demo_stamp.json"] + sorted(demo.rglob("*.png"))[:3]
    before = [path.stat().st_mtime_ns for path in files]
    started = time.time()
    result = make_demo.main(["--out", str(demo), *SMALL])
    assert result["skipped"] and time.time() - started < 2
    assert "demo data already present" in capsys.readouterr().out
    assert [path.stat().st_mtime_ns for path in files] == before


def test_refuses_to_overwrite_a_folder_it_did_not_write(make_demo, tmp_path):
    (tmp_path / "grazpedwri").mkdir()
    (tmp_path / "grazpedwri" / "dataset.csv").write_text("real data\n")
    with pytest.raises(SystemExit):
        make_demo.main(["--out", str(tmp_path), *SMALL])
    assert (tmp_path / "grazpedwri" / "dataset.csv").read_text() == "real data\n"


def test_images_carry_the_labelled_signals(make_demo):
    """Laterality mirrors, a fracture changes the distal radius, age changes the bones."""
    def wrist_task(**changes):
        task = {"kind": "wrist", "path": "", "image_seed": [0, 1, 7], "patient_seed": [0, 2, 7], "study_number": 1,
                "projection": 1, "side": "L", "age": 11.0, "girl": False, "fracture": False, "ao_code": "",
                "cast": False, "metal": False, "osteopenia": False}
        return make_demo.draw_wrist({**task, **changes})

    left = wrist_task()
    assert np.array_equal(wrist_task(side="R"), left[:, ::-1])
    broken = wrist_task(fracture=True, ao_code="23r-M/3.1").astype(float)  # complete: drawn obvious
    changed = np.abs(broken - left) > 4_000
    assert changed.sum() > 100, "a fracture must visibly change the image"
    # A torus/buckle fracture (M/2) is drawn subtle: a faint change, far smaller than an obvious break.
    buckle = np.abs(wrist_task(fracture=True, ao_code="23r-M/2.1").astype(float) - left)
    assert 0 < (buckle > 1_000).sum() < changed.sum() / 10 and (buckle > 300).sum() > 100
    assert not np.array_equal(wrist_task(age=3.0), wrist_task(age=16.0))
    assert wrist_task(projection=2).shape == left.shape  # same framing draws, other anatomy
    assert not np.array_equal(wrist_task(projection=2), left)
