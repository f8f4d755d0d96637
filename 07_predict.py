"""Stage 07: fracture probability (and optionally bone age) for new radiographs: what a hospital runs.

INPUT is any mix of
  a folder      every .png/.jpg/.jpeg/.dcm under it, recursively (and extension-less DICOM files)
  a CSV         column `image_path` (or `path`); optional `projection` (AP/Lat), `age` (years),
                `sex` (M/F), `patient_id`, `study_id`, `laterality` (L/R), and the labels
                `fracture` (0/1) and `boneage` (months); relative paths are read from the CSV's folder
  image files   PNG/JPEG (8 or 16 bit) or DICOM, any transfer syntax (JPEG, JPEG-LS, JPEG 2000, RLE)

Each image gets (resolve_prediction_metadata reads the CSV row and the DICOM header)
  its projection  from the CSV, else the DICOM's ViewPosition, else its ViewCodeSequence, else
                  --projection; with none it is a counted skip
  its age group   from its age (CSV, else the DICOM's PatientAge, else --age) with the age edges
                  stored in the models; with no age, predicted by the age router of 03
  a fracture probability from what 04 deployed for that projection and age group (its
                  deployed.json: the pooled model, the age-conditioned one, the group's own, or
                  the mean of the pooled and own, chosen on validation), and a 0/1 prediction at
                  the deployment's threshold (chosen on validation in 04); `model` names its
                  file(s), two joined by '+' for a mean. The age-conditioned model is given the
                  image's age, or without one the router's expected age (`model_age`).
                  fracture_prob is calibrated (the Platt map 04 chose on validation), raw_prob
                  is the network's own output; the prediction is raw_prob >= the stored threshold,
                  and `threshold` is shown on the calibrated scale (the same decision).
The image is preprocessed exactly as in training (common.preprocess_image at the model's size).
An image that cannot be used (missing, unreadable, no projection, no model for its group) is a
counted skip with its reason, never a crash.

Study rows: a study is the CSV's study_id, or a DICOM's StudyInstanceUID, with its laterality
(CSV, else ImageLaterality/Laterality). fracture_prob is the MAX over the study's images and
fracture_pred is 1 when ANY image is positive at its own model's threshold (common.study_table,
the rule 04 evaluates by): AP and Lat models have different thresholds, and a fracture seen in
one projection is a fracture of the study. patient_id is used for grouping only,
never written.

External validation: when the CSV has a `fracture` column (and patient_id, study_id), the
predictions are also scored against it (evaluate_predictions, with common's metric code, as 04's
test evaluation): image- and study-level AUC, sensitivity, specificity, PPV, NPV with patient-bootstrap
95% CIs at the stored thresholds, calibration, subgroups, ROC/PR/reliability figures; with
`boneage` and --boneage also the MAE.

Nothing identifying is written: no names, IDs or birth dates. Of the DICOM header only the view,
age, sex and laterality are read, and the Study Instance UID only as a keyed hash whose key is
random per run and never stored (study_key). Files straight from a PACS are often named
by their SOP Instance UID, in folders named by Study/Series UID: every path component that looks
like a UID (1.2.840.113619.2.55.3.604688.12345.dcm) is written as uid-<the same keyed hash>
(hide_uids) in every output file, file name and log line, config.json's record of the
inputs included; so is a CSV study_id that is a UID.

Reads   MODELS/fracture/{AP,Lat}/group{g}/deployed.json and the best.pt files it names (04; a run
        from before 04 chose arms: the group's best.pt); MODELS/age/best.pt (03, for images
        without an age); MODELS/boneage/best.pt (05, with --boneage)
Writes  OUT/predictions.csv  level (image/study), input_path, study_id, laterality, projection,
                             projection_source (csv/dicom/flag), age_group, age_group_name,
                             age_group_source (given/predicted), fracture_prob, raw_prob, fracture_pred,
                             threshold, model, model_age (the age given to an age-conditioned model),
                             n_images; bone_age_months (--boneage); cam_path (--cam)
        OUT/skipped.csv      input_path, reason, detail, task: every image left out, why, and for
                             which task (fracture, bone age, or any: the file cannot be read)
        OUT/gradcam/         Grad-CAM++ overlays (--cam), drawn as in 06_gradcam.py
        OUT/evaluation.json, EVALUATION.md, subgroups.csv, roc.png, pr.png, reliability.png
                             (a CSV with `fracture`): {"image": {...}, "study": {...}, "n_images", ...}
        OUT/config.json
        DIR/ (--dicom-out DIR, outside OUT) for each DICOM input with a prediction, filed into its
                             own study (new series and UIDs; patient and study modules copied):
                             NNNNN_sr.dcm  a TID 1500 Structured Report: fracture present/absent,
                                           the calibrated and raw probability, the thresholds and
                                           their rule, the algorithm (architecture, model sha256,
                                           code version), bone age with --boneage, the source image
                             NNNNN_sc.dcm  an RGB Secondary Capture: the Grad-CAM++ overlay with one
                                           line burned in: probability, decision, not for diagnostic use
                             study_NNN_sr.dcm  per study, its images and the study decision (the
                                           study rule above)
                             manifest.csv  predictions.csv's input_path -> the files written for it
                             store_report.csv  (--store) per file: stored or failed, and why
        These DICOM objects carry the patient's name and IDs, by design: they go back into the
        patient's record. Everything in OUT stays de-identified. A PNG/JPEG input is a counted
        skip for DIR only ("no DICOM source to file the result into"): its prediction stays.
        --store HOST:PORT:AET sends DIR's new files with one C-STORE association; a refused
        association or a failed file is a one-line error, and the files stay in DIR.

Run:
  python 07_predict.py new_images/                        # models from outputs/, CSV to outputs/predictions/
  python 07_predict.py worklist.csv --models wrist_models/ --out results/
  python 07_predict.py scan.dcm --age 11 --cam --device cpu
  python 07_predict.py hands/ --projection AP --sex F --boneage
  python 07_predict.py hands/ --sex F --boneage --models bone_age_run/   # a run with only 05's model
  python 07_predict.py hospital_table.csv --models outputs --out external/   # external validation
  python 07_predict.py worklist/ --dicom-out pacs_out/ --store PACSHOST:104:PACS_AET   # results into the PACS
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import secrets
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

import common

SKIPS_SHOWN = 20
IMAGE_PROBLEMS = ("file not found", "unreadable image")  # 07's skips that no task can use


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT",
                        help="folders, CSV files or image files (PNG/JPEG/DICOM)")
    parser.add_argument("--projection", choices=["AP", "Lat"],
                        help="projection of images whose CSV row or DICOM gives none (default: none: skip them)")
    parser.add_argument("--age", type=float, help="age in years of images with no age of their own "
                                                  "(default: predict the age group with the router)")
    parser.add_argument("--sex", choices=["M", "F"], help="sex of images with no sex of their own "
                                                          "(needed by --boneage)")
    parser.add_argument("--models", type=Path, default=common.DEFAULT_OUT,
                        help="the outputs folder where 03/04/05 wrote their checkpoints (default: outputs/)")
    parser.add_argument("--out", type=Path, help="where to write predictions.csv (default: MODELS/predictions/)")
    parser.add_argument("--boneage", action="store_true", help="also predict bone age (hand radiographs; needs sex)")
    parser.add_argument("--cam", action="store_true", help="also write Grad-CAM++ overlays")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: 16)")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="patient resamples for the evaluation's 95%% CIs (default: 1000)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where to run (default: auto = CUDA if visible)")
    parser.add_argument("--dicom-out", type=Path, metavar="DIR",
                        help="also write a DICOM SR and an overlay per DICOM input into DIR, filed into its "
                             "study; they carry the patient's identifiers (default: none)")
    parser.add_argument("--store", metavar="HOST:PORT:AET",
                        help="send what --dicom-out wrote to this DICOM server with C-STORE (default: none)")
    parser.add_argument("--calling-aet", default="PEDWRIST",
                        help="our AE title for --store, as the PACS knows it (default: PEDWRIST)")
    args = parser.parse_args(argv)
    if args.age is not None and not 0 <= args.age < 30:
        parser.error(f"--age {args.age:g}: give the age in years (0 to 30)")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    args.out = args.out or args.models / "predictions"
    _check_dicom_flags(args)
    return args


def main(argv=None):
    args = parse_args(argv)
    common.import_torch()
    fracture_models = common.fracture_models(args.models / "fracture")
    boneage_path = args.models / "boneage" / "best.pt"
    if not fracture_models and not (args.boneage and boneage_path.is_file()):
        # A bone-age-only run (run_all.py --boneage-data alone) predicts bone age with --boneage.
        raise common.InputError(f"{args.models / 'fracture'}: no trained fracture model (best.pt); pass "
                                "--models with the outputs folder of 04_train_fracture_ddp.py, or run it first"
                                + ("; for bone age alone add --boneage" if boneage_path.is_file() else ""))
    edges = _age_edges(fracture_models) if fracture_models else None
    if args.boneage and not boneage_path.is_file():
        raise common.InputError(f"{boneage_path}: not found; --boneage needs the bone-age model: run "
                                "05_train_boneage.py with --out set to the --models folder")
    out_dir = common.ensure_writable_dir(args.out)
    device = common.resolve_device(args.device)

    salt = secrets.token_bytes(16)  # the key of the study and UID hashes lives for this run only
    hide = functools.partial(hide_uids, salt=salt)
    images = collect_prediction_inputs(args.inputs)
    # Written UID-free (a CSV's study_id may be a Study Instance UID too); `path` is the file read.
    images[["input_path", "study_id"]] = images[["input_path", "study_id"]].map(hide, na_action="ignore")
    common.log(f"07: {len(images)} input images; models from {hide(args.models)}")
    resolve_prediction_metadata(images, salt, projection=args.projection, age=args.age, sex=args.sex)
    dicom_out = DicomResults(args.dicom_out, args.models, images, hide) if args.dicom_out else None
    if fracture_models:
        assign_age_groups(images, edges, args.models / "age" / "best.pt", args, device)
        predict_fractures(images, fracture_models, edges, args, device, out_dir, dicom_out)
    else:
        common.log(f"07: no fracture models under {hide(args.models / 'fracture')}: bone age only")
        _no_fracture_track(images)
    if args.boneage:
        predict_bone_age(images, boneage_path, args, device)
    if dicom_out:
        dicom_out.file_reports(images, boneage_path if args.boneage else None)

    predicted = images["fracture_prob"].notna()
    if args.boneage:
        predicted |= images["bone_age_months"].notna()
    table = pd.concat([_image_rows(images[predicted], edges, args), _study_rows(images[predicted])],
                      ignore_index=True).reindex(columns=_output_columns(args))
    common.write_csv(table, out_dir / "predictions.csv")
    skipped = _skip_table(images, hide)
    common.write_csv(skipped, out_dir / "skipped.csv")
    if images["label"].notna().any() or images["boneage"].notna().any():
        evaluate_predictions(images, skipped, edges, out_dir, n_boot=args.bootstrap, hide=hide)
    common.write_run_config(out_dir, args, hide=hide, models=str(args.models.resolve()))
    _print_summary(table, skipped, out_dir, hide)
    if args.store:
        store_results(dicom_out, _store_target(args.store), args.calling_aet)
    return table


# ------------------------------------------------------------------------------------------------
# Reading the inputs: worklist, CSV columns, DICOM tags, study keys and UID hiding
# ------------------------------------------------------------------------------------------------

# 07's CSV column -> its images column; every one optional (a hospital table has them all).
PREDICTION_CSV_COLUMNS = {"study_id": "study_id", "patient_id": "patient_id", "laterality": "csv_laterality",
                          "projection": "csv_projection", "age": "csv_age", "sex": "csv_sex",
                          "fracture": "label", "boneage": "boneage"}


def collect_prediction_inputs(inputs: Sequence[Path]) -> pd.DataFrame:
    """07's inputs (folders, CSVs, image files) as one row per image: input_path as given, path to
    read, and the CSV's own values (PREDICTION_CSV_COLUMNS, None where not given)."""
    rows = []
    for item in inputs:
        if item.is_dir():
            rows += [{"input_path": str(path)} for path in _images_under(item)]
        elif item.suffix.lower() == ".csv" and item.is_file():
            rows += _prediction_rows_from_csv(item)
        elif item.is_file():
            rows.append({"input_path": str(item)})
        else:
            raise common.InputError(f"{item}: no such folder, CSV or image file")
    if not rows:
        raise common.InputError(f"{', '.join(map(str, inputs))}: no images found (.png/.jpg/.jpeg/.dcm)")
    frame = pd.DataFrame(rows, columns=["input_path", "path", *PREDICTION_CSV_COLUMNS.values()])
    frame["path"] = frame["path"].fillna(frame["input_path"]).map(Path)
    return frame.astype(object).where(frame.notna(), None)


def _images_under(folder: Path) -> list[Path]:
    found = []
    for parent, _, names in os.walk(folder, followlinks=True):
        for name in names:
            path = Path(parent) / name
            if name.startswith("."):
                continue
            # Hospital exports often name DICOM files without an extension (IM000001).
            if path.suffix.lower() in common.IMAGE_SUFFIXES or (not path.suffix and common.is_dicom(path)):
                found.append(path)
    return sorted(found)


def _prediction_rows_from_csv(csv_path: Path) -> list[dict]:
    table = common.read_table_csv(csv_path)
    path_column = next((c for c in ("image_path", "path") if c in table.columns), None)
    if path_column is None:
        raise common.InputError(f"{csv_path}: no `image_path` (or `path`) column; the CSV needs one "
                                f"image path per row, plus optional {', '.join(PREDICTION_CSV_COLUMNS)}")
    table = table[table[path_column] != ""]
    _check_prediction_labels(table, csv_path)
    return [{"input_path": record[path_column],
             "path": str(common.resolve_table_path(csv_path, record[path_column])),
             **{column: record.get(name) or None for name, column in PREDICTION_CSV_COLUMNS.items()}}
            for record in table.to_dict("records")]


def _check_prediction_labels(table: pd.DataFrame, csv_path: Path) -> None:
    """Labels are scored, so a bad one is an error, not a skip; scoring needs patients and studies."""
    if "fracture" in table and not table["fracture"].isin(["0", "1"]).all():
        bad = table.loc[~table["fracture"].isin(["0", "1"]), "fracture"].iloc[0]
        raise common.InputError(f"{csv_path}: fracture {bad!r}; the label must be 0 or 1 on every row")
    if "boneage" in table and pd.to_numeric(table["boneage"], errors="coerce").isna().any():
        raise common.InputError(f"{csv_path}: a boneage value is not a number of months; fill every row")
    needed = ["patient_id", "study_id"] if "fracture" in table else ["patient_id"] if "boneage" in table else []
    missing = [c for c in needed if c not in table or table[c].eq("").any()]
    if missing:
        raise common.InputError(f"{csv_path}: labels but no {' and '.join(missing)} on every row; the "
                                "evaluation resamples patients and scores studies")


def resolve_prediction_metadata(images: pd.DataFrame, study_salt: bytes, *, projection: str | None = None,
                                age: float | None = None, sex: str | None = None) -> None:
    """Projection, age, sex, laterality and study of each row of collect_prediction_inputs: its
    CSV row, else its DICOM header (read_dicom_tags), else the flag given here (07's --projection,
    --age, --sex). An image that cannot be used is marked with skip_image, never dropped."""
    for column in ("projection", "projection_source", "age", "sex", "laterality", "skip_reason", "skip_detail"):
        images[column] = None
    for index, row in common.progress(images.iterrows(), total=len(images), desc="read headers", unit="img"):
        path = row["path"]
        if not path.is_file():
            skip_image(images, index, "file not found", str(path))
            continue
        tags = {}
        if common.is_dicom(path):
            try:
                tags = read_dicom_tags(path, study_salt)
            except Exception as error:  # noqa: BLE001 -- pydicom raises many types for a bad file
                skip_image(images, index, "unreadable image", f"DICOM header: {type(error).__name__}: {error}")
                continue
        csv_projection, csv_age, csv_sex = row["csv_projection"], row["csv_age"], row["csv_sex"]
        # Study, side and sex first: a view or an age the fracture models cannot use stops the
        # fracture prediction only, and bone age (--boneage) needs the sex of such an image too.
        images.at[index, "study_id"] = row["study_id"] or tags.get("study_key")
        laterality = (row["csv_laterality"] or "").upper()
        images.at[index, "laterality"] = laterality if laterality in ("L", "R") else tags.get("laterality")
        csv_sex = csv_sex and common.SEX_NAMES.get(csv_sex.lower())
        images.at[index, "sex"], _ = _first_given(csv_sex, tags.get("sex"), sex)
        if csv_age is not None and not _is_age(csv_age):
            skip_image(images, index, "age not a number of years", f"CSV age {csv_age!r}")
            continue
        images.at[index, "age"], _ = _first_given(csv_age and float(csv_age), tags.get("age"), age)
        if csv_projection is not None and csv_projection.lower() not in common.PROJECTION_NAMES:
            skip_image(images, index, "projection not AP or Lat", f"CSV projection {csv_projection!r}")
            continue
        if csv_projection is None and tags.get("projection") == "other":
            skip_image(images, index, "projection not AP or Lat", f"DICOM {tags['view_source']} names another view")
            continue
        images.at[index, "projection"], images.at[index, "projection_source"] = _first_given(
            csv_projection and common.PROJECTION_NAMES[csv_projection.lower()], tags.get("projection"), projection)
        if images.at[index, "projection"] is None:  # bone age (--boneage) needs none
            skip_image(images, index, "no projection", "give a projection column, --projection, or a "
                                                       "DICOM with ViewPosition or ViewCodeSequence")


def _first_given(csv_value, dicom_value, flag_value) -> tuple:
    """(value, where it came from): the image's own value wins; a flag only fills a gap."""
    for value, source in ((csv_value, "csv"), (dicom_value, "dicom"), (flag_value, "flag")):
        if value is not None:
            return value, source
    return None, None


def _is_age(text: str) -> bool:
    try:
        return 0 <= float(text) < 30
    except ValueError:
        return False


def skip_image(images: pd.DataFrame, index, reason: str, detail: str) -> None:
    """Record why an image gets no fracture prediction (the first reason found is kept)."""
    if images.at[index, "skip_reason"] is None:
        images.at[index, "skip_reason"] = reason
        images.at[index, "skip_detail"] = " ".join(str(detail).split())  # one line


# DICOM's DX view codes (CID 4010) for the two modelled projections. pydicom's Code compares
# SNOMED CT codes with their legacy SRT forms (R-10206 == 399348003), so both spellings match.
def _view_codes() -> dict[str, list]:
    from pydicom.sr.codedict import codes
    return {"AP": [codes.SCT.AnteroPosterior, codes.SCT.PosteroAnterior, codes.SCT.Frontal],
            "Lat": [codes.SCT.LateralProjection, codes.SCT.RightLateral, codes.SCT.LeftLateral,
                    codes.SCT.LateralMedial, codes.SCT.MedioLateralProjection]}


DICOM_VIEW_POSITIONS = {"AP": "AP", "PA": "AP", "LAT": "Lat", "LL": "Lat", "RL": "Lat", "LATERAL": "Lat"}


def read_dicom_tags(path: Path, study_salt: bytes = b"") -> dict:
    """The few non-identifying values a hospital run may use: view, age, sex, laterality, study.

    projection   'AP'/'Lat' from ViewPosition, else the ViewCodeSequence; 'other' for a view given
                 but not modelled (oblique, ...); None when the file gives none
    view_source  'ViewPosition' or 'ViewCodeSequence'
    age (years), sex ('M'/'F'), laterality ('L'/'R' from ImageLaterality, else Laterality)
    study_key    a keyed one-way hash of StudyInstanceUID (see study_key); never the UID itself
    Names, IDs and birth dates are never read into anything the pipeline writes.
    """
    import pydicom
    from pydicom.sr.coding import Code
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    view = str(dataset.get("ViewPosition", "") or "").strip().upper()
    projection, source = DICOM_VIEW_POSITIONS.get(view, "other" if view else None), "ViewPosition"
    if projection is None and dataset.get("ViewCodeSequence"):
        item = dataset.ViewCodeSequence[0]
        code = Code(str(item.get("CodeValue", "")), str(item.get("CodingSchemeDesignator", "")),
                    str(item.get("CodeMeaning", "")))
        source = "ViewCodeSequence"
        projection = next((name for name, known in _view_codes().items() if code in known), "other")
    laterality = str(dataset.get("ImageLaterality", "") or dataset.get("Laterality", "") or "").upper()
    sex = str(dataset.get("PatientSex", "") or "").upper()
    uid = str(dataset.get("StudyInstanceUID", "") or "")
    return {"projection": projection, "view_source": source if projection else None,
            "age": _dicom_age_years(str(dataset.get("PatientAge", "") or "")),
            "sex": sex if sex in ("M", "F") else None,
            "laterality": laterality if laterality in ("L", "R") else None,
            "study_key": study_key(uid, study_salt) if uid else None}


def study_key(uid: str, salt: bytes) -> str:
    """'S' + 16 hex digits of HMAC-SHA256(salt, StudyInstanceUID).

    A plain hash is not enough: UIDs are an organisation root plus a timestamp and a counter, few
    enough guesses to brute-force. Keyed with a random salt that is made per run and never
    written, the key groups the images of one run and cannot be traced back to the study.
    """
    import hashlib
    import hmac
    return "S" + hmac.new(salt, uid.encode(), hashlib.sha256).hexdigest()[:16]


# A DICOM UID as a whole path component or word, with or without a file suffix (.dcm): a PACS
# export names files by their SOP Instance UID and folders by the Study/Series Instance UID. The
# UID grammar is [0-2](.(0|[1-9][0-9]*))+; leading zeros are accepted too (some vendors write
# them: masking a look-alike costs nothing, a missed UID is a leak), from 4 parts up so that a
# version like 1.2.3 stays readable.
_UID_IN_TEXT = re.compile(r"(?<![\w.-])([0-2](?:\.[0-9]+){3,})(?=(?:\.[A-Za-z][A-Za-z0-9]*)?(?![\w-]|\.\w))")


def hide_uids(text, salt: bytes) -> str:
    """`text` (a path, an error message, a log line) with every DICOM UID in it written as
    'uid-' + study_key's keyed hash: the same UID gets the same name within a run (so a study
    folder still groups its files), and no name can be traced back to its UID."""
    return _UID_IN_TEXT.sub(lambda match: "uid-" + study_key(match.group(1), salt)[1:], str(text))


def _dicom_age_years(text: str) -> float | None:
    match = re.fullmatch(r"(\d{1,3})([DWMY])", text.strip().upper())
    if not match:
        return None
    value, unit = int(match.group(1)), match.group(2)
    return value / {"D": 365.25, "W": 52.18, "M": 12.0, "Y": 1.0}[unit]


# ------------------------------------------------------------------------------------------------
# Predicting: age groups (given or routed), fractures, bone age
# ------------------------------------------------------------------------------------------------

def _no_fracture_track(images: pd.DataFrame) -> None:
    """The fracture columns, empty, for a run that trained only the bone-age model; the images
    are not listed as fracture skips (there was nothing to predict)."""
    for column in ("age_group", "age_group_source", "fracture_prob", "raw_prob", "fracture_pred", "threshold",
                   "model", "model_age", "cam_path"):
        images[column] = None
    no_projection = images["skip_reason"] == "no projection"
    images.loc[no_projection, ["skip_reason", "skip_detail"]] = None


def _age_edges(fracture_models: dict) -> tuple[float, ...]:
    """The age edges the fracture models were trained with (each checks it agrees when loaded)."""
    checkpoint = common.load_checkpoint(next(iter(fracture_models.values()))["paths"][0])
    return tuple(float(e) for e in checkpoint["age_edges"])


def assign_age_groups(images: pd.DataFrame, edges, router_path: Path, args, device) -> None:
    """The group of a given age with the models' edges; otherwise the 03 router's prediction (its
    probabilities kept in `age_group_probs`: an age-conditioned model is given the expected age)."""
    images["age_group"], images["age_group_source"], images["age_group_probs"] = None, None, None
    usable = images["skip_reason"].isna()
    given = usable & images["age"].notna()
    groups = common.age_group_of(images.loc[given, "age"].astype(float), edges)
    images.loc[given, "age_group"] = [int(group) for group in groups]
    images.loc[given, "age_group_source"] = "given"
    unknown = images.index[usable & images["age"].isna()]
    if len(unknown) == 0:
        return
    if not router_path.is_file():
        for index in unknown:
            skip_image(images, index, "no age and no age router", f"{router_path} not found: "
                       "give an age (CSV column, --age) or run 03_train_age.py")
        return
    router, checkpoint = common.load_trained_model(router_path, device)
    _check_edges(checkpoint, edges, router_path)
    for indices, squares, _ in _batches(images, unknown, checkpoint["image_size"], args.batch_size,
                                        "age router", skip_image):
        probs = _infer(router, squares, device).softmax(dim=1)
        images.loc[indices, "age_group"] = probs.argmax(dim=1).tolist()
        images.loc[indices, "age_group_source"] = "predicted"
        images.loc[indices, "age_group_probs"] = pd.Series(probs.numpy().tolist(), index=indices, dtype=object)


def _check_edges(checkpoint: dict, edges, path: Path) -> None:
    if tuple(float(e) for e in checkpoint.get("age_edges", ())) != tuple(edges):
        raise common.InputError(f"{path}: trained with age edges {checkpoint.get('age_edges')}, the other "
                                f"models with {list(edges)}; retrain all models from one run")


def _batches(images: pd.DataFrame, indices, size: int, batch_size: int, desc: str, skip):
    """Yield (indices, uint8 [B, S, S] squares, letterboxes) of the readable images, batch by batch.

    Preprocessing is common.preprocess_image, the function training used; an image that cannot be
    decoded is recorded with `skip` (skip_image or _skip_bone_age) and never reaches a model.
    """
    indices = list(indices)
    for start in common.progress(range(0, len(indices), batch_size), desc=desc, unit="batch"):
        kept, squares, boxes = [], [], []
        for index in indices[start:start + batch_size]:
            try:
                square, box = common.preprocess_image(images.at[index, "path"], size)
            except Exception as error:  # noqa: BLE001 -- one bad file must not stop the whole batch
                skip(images, index, "unreadable image", str(error))
                continue
            kept.append(index)
            squares.append(square)
            boxes.append(box)
        if kept:
            yield kept, np.stack(squares), boxes


def _infer(model, squares: np.ndarray, device, *extra):
    """Forward pass as in evaluation (common.predict): bf16 autocast on CUDA, fp32 on CPU, so the
    probabilities are on the scale the threshold was chosen on."""
    import torch
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                enabled=device.type == "cuda"):
        batch = common.prepare_images(torch.from_numpy(squares).unsqueeze(1), device, train=False,
                                      channels_last=True)  # as common.predict, for the same numbers
        return model(batch, *(e.to(device) for e in extra)).float().cpu()


def predict_fractures(images: pd.DataFrame, fracture_models: dict, edges, args, device, out_dir: Path,
                      dicom_out: DicomResults | None = None) -> None:
    """Run each (projection, age group)'s deployed models on its images (the mean of their
    probabilities when 04 deployed two); with --cam also write Grad-CAM++ overlays (common's, as
    06 draws them, averaged over the models); with --dicom-out file them as Secondary Captures."""
    import torch
    for column in ("fracture_prob", "raw_prob", "fracture_pred", "threshold", "raw_threshold", "model", "model_age",
                   "cam_path"):
        images[column] = None
    ready = images[images["skip_reason"].isna() & images["age_group"].notna()]
    for (projection, group), members in ready.groupby(["projection", "age_group"]):
        group = int(group)
        deployed = fracture_models.get((projection, group))
        if deployed is None:
            for index in members.index:
                skip_image(images, index, "no fracture model for the group",
                           _missing_model_detail(args.models, projection, group, edges))
            continue
        models = [common.load_trained_model(path, device) for path in deployed["paths"]]
        for path, (_, checkpoint) in zip(deployed["paths"], models):
            _check_edges(checkpoint, edges, path)
        threshold, calibration = float(deployed["threshold"]), deployed["calibration"]
        relative = "+".join(path.relative_to(args.models).as_posix() for path in deployed["paths"])
        for indices, squares, boxes in _batches(images, members.index, checkpoint["image_size"],
                                                args.batch_size, f"{projection} group {group}",
                                                skip_image):
            ages = _model_ages(images, indices, models)
            probs = np.mean([torch.sigmoid(_infer(model, squares, device, *_side_input(model, ages))
                                           .reshape(len(indices), -1)[:, 0]).numpy()
                             for model, _ in models], axis=0).astype(float)
            images.loc[indices, "model_age"] = None if ages is None else ages.round(2)
            images.loc[indices, "fracture_prob"] = common.apply_calibration(probs, calibration)
            images.loc[indices, "raw_prob"] = probs
            images.loc[indices, "fracture_pred"] = (probs >= threshold).astype(int)  # as 04 decided
            images.loc[indices, "threshold"] = float(common.apply_calibration([threshold], calibration)[0])
            images.loc[indices, "raw_threshold"] = threshold
            images.loc[indices, "model"] = relative
            cams = None  # the --cam maps serve --dicom-out too
            if args.cam:
                cams, _ = common.deployed_grad_cam(models, squares, device, ages)
                for index, cam, box, prob in zip(indices, cams, boxes, probs):
                    stem = Path(images.at[index, "input_path"]).stem  # the UID-free name
                    name = f"{index:05d}_{stem}_p{prob:.2f}.png"
                    overlay = common.render_overlay(images.at[index, "path"], cam, box,
                                                     common.caption(float(prob), threshold))
                    common.write_png(overlay, out_dir / "gradcam" / name)
                    images.at[index, "cam_path"] = f"gradcam/{name}"
            if dicom_out:
                dicom_out.file_overlays(images, indices, squares, boxes, cams, models, device, ages)
        del models


def _model_ages(images: pd.DataFrame, indices, models: list) -> np.ndarray | None:
    """The age in years an age-conditioned model (04) is given: the image's own age when known,
    else the router's expected age, its probability of each group x the group's mean training
    age (stored in the checkpoint), as 04 scored cascade_pred. None: no deployed model takes an age."""
    checkpoint = next((c for _, c in models if c.get("side_input") == "age"), None)
    if checkpoint is None:
        return None
    means = np.asarray(checkpoint["group_mean_age"], dtype=float)
    return np.array([images.at[i, "age"] if pd.notna(images.at[i, "age"])
                     else float(np.dot(images.at[i, "age_group_probs"], means)) for i in indices], dtype=float)


def _side_input(model, ages) -> tuple:
    """The second input of an age-conditioned model (the ages as a tensor); nothing for the others."""
    import torch
    return (torch.as_tensor(ages, dtype=torch.float32),) if getattr(model, "side_input", None) == "age" else ()


def _missing_model_detail(models: Path, projection: str, group: int, edges) -> str:
    """Why 04 left this model out, from its summary.csv when there is one."""
    name = f"{projection} group {group} {common.age_group_names(edges)[group]}"
    summary = models / "fracture" / "summary.csv"
    if summary.is_file():
        rows = pd.read_csv(summary)
        match = rows[(rows["kind"] == "model") & (rows["projection"] == projection)
                     & (rows["age_group"] == group) & (rows["status"] == "skipped")]
        if not match.empty:
            return f"{name} was skipped in training: {match['reason'].iloc[0]}"
    return f"{name}: no {models / 'fracture' / projection / f'group{group}' / 'best.pt'}"


def predict_bone_age(images: pd.DataFrame, boneage_path: Path, args, device) -> None:
    """Bone age in months for every readable image with a sex (the model needs it as an input)."""
    import torch
    images["bone_age_months"], images["boneage_skip"], images["boneage_detail"] = None, None, None
    readable = ~images["skip_reason"].isin(IMAGE_PROBLEMS)
    for index in images.index[readable & images["sex"].isna()]:
        _skip_bone_age(images, index, "no sex", "give a sex column, --sex, or a DICOM with PatientSex")
    model, checkpoint = common.load_trained_model(boneage_path, device)
    wanted = images.index[readable & images["sex"].notna()]
    for indices, squares, _ in _batches(images, wanted, checkpoint["image_size"], args.batch_size,
                                        "bone age", _skip_bone_age):
        male = torch.tensor([int(images.at[i, "sex"] == "M") for i in indices], dtype=torch.long)
        images.loc[indices, "bone_age_months"] = _infer(model, squares, device, male).numpy().astype(float)


def _skip_bone_age(images: pd.DataFrame, index, reason: str, detail: str = "") -> None:
    images.at[index, "boneage_skip"] = f"bone age: {reason}"
    images.at[index, "boneage_detail"] = " ".join(str(detail).split())


# ------------------------------------------------------------------------------------------------
# The output tables: images, studies, skips
# ------------------------------------------------------------------------------------------------

def _image_rows(images: pd.DataFrame, edges, args) -> pd.DataFrame:
    names = common.age_group_names(edges) if edges is not None else []
    rows = images[["input_path", "study_id", "laterality", "projection", "projection_source", "age_group",
                   "age_group_source", "fracture_prob", "raw_prob", "fracture_pred", "threshold", "model",
                   "model_age"]].copy()
    rows["level"], rows["n_images"] = "image", 1
    rows["age_group_name"] = [None if group is None else names[int(group)] for group in rows["age_group"]]
    rows["fracture_pred"] = rows["fracture_pred"].astype("Int64")  # empty for a bone-age-only row
    if args.boneage:
        rows["bone_age_months"] = images["bone_age_months"].astype(float).round(1)
    if args.cam:
        rows["cam_path"] = images["cam_path"]
    return rows.reset_index(drop=True)


def _study_rows(images: pd.DataFrame) -> pd.DataFrame:
    """One row per study (common.study_table: max probability, positive if any image is)."""
    scored = study_keys(images[images["study_id"].notna() & images["fracture_prob"].notna()])
    if scored.empty:
        return pd.DataFrame()
    studies = common.study_table(scored.assign(fracture_pred=scored["fracture_pred"].astype(int),
                                               fracture_prob=scored["fracture_prob"].astype(float),
                                               raw_prob=scored["raw_prob"].astype(float)),
                                 "fracture_prob", "fracture_pred", raw_prob=("raw_prob", "max"))
    views = scored.groupby(["patient_id", "study_id", "laterality"])["projection"].agg(
        lambda p: "+".join(sorted(set(p)))).rename("projection").reset_index()
    studies = studies.merge(views, on=["patient_id", "study_id", "laterality"])
    studies["laterality"] = studies["laterality"].replace("", None)
    return studies.rename(columns={"prob": "fracture_prob", "decision": "fracture_pred"}).assign(level="study")


def _output_columns(args) -> list[str]:
    return ["level", "input_path", "study_id", "laterality", "projection", "projection_source", "age_group",
            "age_group_name", "age_group_source", "fracture_prob", "raw_prob", "fracture_pred", "threshold",
            "model", "model_age", "n_images", *(["bone_age_months"] if args.boneage else []),
            *(["cam_path"] if args.cam else [])]


def _skip_table(images: pd.DataFrame, hide) -> pd.DataFrame:
    """Every skip with its reason and the task it stops (`any` for a file no task can read, `dicom
    out` for a result that cannot be filed); the details (error messages may quote the path) through
    `hide`."""
    fracture = images[images["skip_reason"].notna()]
    frames = [pd.DataFrame({"input_path": fracture["input_path"], "reason": fracture["skip_reason"],
                            "detail": fracture["skip_detail"],
                            "task": np.where(fracture["skip_reason"].isin(IMAGE_PROBLEMS), "any", "fracture")})]
    for task, reason, detail in (("bone age", "boneage_skip", "boneage_detail"),
                                 ("dicom out", "dicom_out_skip", "dicom_out_detail")):
        if reason in images:  # a task's own skips: the image may still have its other results
            skips = images[images[reason].notna()]
            frames.append(pd.DataFrame({"input_path": skips["input_path"], "reason": skips[reason],
                                        "detail": skips[detail], "task": task}))
    skipped = pd.concat(frames, ignore_index=True)
    return skipped.assign(detail=skipped["detail"].map(hide, na_action="ignore"))


def _print_summary(table: pd.DataFrame, skipped: pd.DataFrame, out_dir: Path, hide) -> None:
    for row in skipped.head(SKIPS_SHOWN).itertuples():
        common.log(f"skipped {row.input_path}: {row.reason}" + (f" ({row.detail})" if row.detail else ""))
    if len(skipped) > SKIPS_SHOWN:
        common.log(f"... and {len(skipped) - SKIPS_SHOWN} more skips listed in {hide(out_dir / 'skipped.csv')}")
    images = table[table["level"] == "image"]
    counts = Counter(skipped["reason"])
    reasons = ", ".join(f"{n} {reason}" for reason, n in counts.most_common()) or "none"
    studies = int((table["level"] == "study").sum()) if len(table) else 0
    common.log(f"07: predicted {len(images)} images" + (f" and {studies} studies" if studies else "")
               + f"; skipped {len(skipped)} ({reasons}) -> {hide(out_dir / 'predictions.csv')}")


# ------------------------------------------------------------------------------------------------
# External validation: the predictions scored against a hospital's labels (metrics as in 04)
# ------------------------------------------------------------------------------------------------

EVALUATION_SUBGROUPS = ["projection", "age_group_name", "age_group_source", "sex", "laterality"]


def evaluate_predictions(images: pd.DataFrame, skipped: pd.DataFrame, edges, out_dir: Path, *, n_boot: int,
                         hide: Callable[[str], str] = str) -> dict:
    """07's external validation: its labelled images, with the skips that concern each label, go
    to evaluate_external; the headline figures are logged (paths through `hide`, see hide_uids)."""
    labelled = study_keys(images[images["label"].notna() | images["boneage"].notna()]).assign(
        label=lambda frame: pd.to_numeric(frame["label"]), boneage=lambda frame: pd.to_numeric(frame["boneage"]))
    names = common.age_group_names(edges) if edges is not None else []
    labelled["age_group_name"] = [None if pd.isna(group) else names[int(group)] for group in labelled["age_group"]]
    # A labelled image with no prediction for what its label scores is a skip of the evaluation.
    fracture_skips = skipped["input_path"].isin(labelled.loc[labelled["label"].notna(), "input_path"]) \
        & skipped["task"].isin(["fracture", "any"])
    bone_skips = skipped["input_path"].isin(labelled.loc[labelled["boneage"].notna(), "input_path"]) \
        & skipped["task"].isin(["bone age", "any"])
    result = evaluate_external(labelled, skipped[fracture_skips | bone_skips], out_dir, n_boot=n_boot, seed=0)
    if "image" in result:
        image = result["image"]
        common.log(f"07 external validation: image AUC {image['auc']:.3f} [{image['auc_lo']:.3f}, "
            f"{image['auc_hi']:.3f}], study AUC {result['study']['auc']:.3f} on {result['n_images']} "
            f"images of {result['n_patients']} patients -> {hide(out_dir / 'EVALUATION.md')}")
    if "boneage" in result:
        common.log(f"07 external validation: bone-age MAE {result['boneage']['mae']:.1f} months "
                   f"[{result['boneage']['mae_lo']:.1f}, {result['boneage']['mae_hi']:.1f}]")
    return result


def study_keys(images: pd.DataFrame) -> pd.DataFrame:
    """patient_id and laterality as '' where unknown: a study key must not be dropped as NaN."""
    return images.assign(patient_id=images["patient_id"].fillna("").astype(str),
                         laterality=images["laterality"].fillna(""))


def evaluate_external(images: pd.DataFrame, skipped: pd.DataFrame, out_dir: Path, *, n_boot: int = 1000,
                      seed: int = 0) -> dict:
    """Score predictions against a hospital's labels with the shared metric functions (as 04).

    `images`: one row per labelled input image: label (fracture 0/1) and/or boneage (months),
    patient_id, study_id, laterality, fracture_prob, fracture_pred (at the model's stored
    threshold), threshold, model, bone_age_months, and the subgroup columns. Images without a
    prediction are in `skipped` and counted in the report (leaving them out silently would flatter
    every figure). The thresholds are the ones 04 chose on ITS validation set: nothing here is
    tuned on the hospital's data. Intervals resample patients. Writes evaluation.json,
    EVALUATION.md and, for fractures, subgroups.csv, roc.png, pr.png, reliability.png.
    """
    fractures = images[images["label"].notna() & images["fracture_prob"].notna()] if "label" in images else images[:0]
    hands = (images[images["boneage"].notna() & images["bone_age_months"].notna()]
             if {"boneage", "bone_age_months"} <= set(images) else images[:0])
    if fractures.empty and hands.empty:
        raise common.InputError(f"{out_dir}: no labelled image got a prediction ({len(skipped)} skipped, see "
                         "skipped.csv); nothing to evaluate")
    result = {"n_skipped": int(len(skipped)),
              "skipped_reasons": {str(k): int(v) for k, v in skipped["reason"].value_counts().items()}}
    subgroups = pd.DataFrame()
    if not fractures.empty:
        result.update(_fracture_evaluation(fractures, n_boot, seed, out_dir))
        subgroups = _subgroup_table(fractures, n_boot, seed)
        common.write_csv(subgroups, out_dir / "subgroups.csv")
    if not hands.empty:
        result["boneage"] = _bone_age_error(hands, n_boot, seed)
        result.setdefault("n_images", int(len(hands)))
        result.setdefault("n_patients", int(hands["patient_id"].nunique()))
    common.write_json(result, out_dir / "evaluation.json")
    with common.atomic_path(out_dir / "EVALUATION.md") as tmp:
        tmp.write_text(_evaluation_markdown(result, subgroups))
    return result


def _fracture_evaluation(images: pd.DataFrame, n_boot: int, seed: int, out_dir: Path) -> dict:
    """Image and study metrics, calibration and the figures of the fracture predictions."""
    labels, probs = images["label"].astype(int).to_numpy(), images["fracture_prob"].astype(float).to_numpy()
    patients = images["patient_id"].astype(str).to_numpy()
    studies = common.study_table(images.assign(fracture_pred=images["fracture_pred"].astype(int),
                                               fracture_prob=probs, label=labels), "fracture_prob", "fracture_pred")
    studies = studies.astype({"label": int, "prob": float, "decision": int})
    common.plot_roc(labels, probs, out_dir / "roc.png", "external validation, images")
    common.plot_pr(labels, probs, out_dir / "pr.png", "external validation, images")
    common.plot_reliability({"images": (labels, probs), "studies": (studies["label"].to_numpy(),
                                                                    studies["prob"].to_numpy())},
                            out_dir / "reliability.png", "calibration (external)")
    return {
        "image": metrics_at_stored_thresholds(labels, probs, images["fracture_pred"], patients, n_boot, seed),
        "study": metrics_at_stored_thresholds(studies["label"], studies["prob"], studies["decision"],
                                              studies["patient_id"].astype(str), n_boot, seed),
        "n_images": int(len(images)), "n_patients": int(len(set(patients))), "n_studies": int(len(studies)),
        "thresholds": {str(m): float(t) for m, t in images.groupby("model")["threshold"].first().items()},
        "calibration": {"image": common.calibration_metrics(labels, probs),
                        "study": common.calibration_metrics(studies["label"], studies["prob"])},
    }


def metrics_at_stored_thresholds(labels, probs, decisions, patients, n_boot: int, seed: int) -> dict:
    """binary_metrics_with_ci where each image was decided at ITS model's threshold.

    AP and Lat (and each age group) have their own threshold, so one cut on the pooled
    probabilities would not be the deployed decision: AUC ranks the probabilities, every
    threshold metric counts the stored 0/1 decisions.
    """
    result = common.binary_metrics_with_ci(labels, probs, patients, float("nan"), n_boot=n_boot, seed=seed,
                                           decisions=np.asarray(decisions, dtype=int))
    result["threshold"] = "stored per model"
    return result


def _bone_age_error(known: pd.DataFrame, n_boot: int, seed: int) -> dict:
    errors = common.regression_metrics_with_ci(known["boneage"].astype(float), known["bone_age_months"].astype(float),
                                               known["patient_id"].astype(str), n_boot, seed)
    return {key: errors[key] for key in ("n", "mae", "mae_lo", "mae_hi")}


def _subgroup_table(images: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    rows = []
    for column in [c for c in EVALUATION_SUBGROUPS if c in images and images[c].notna().any()]:
        for value, part in images.groupby(images[column].fillna("unknown").astype(str), sort=True):
            metrics = metrics_at_stored_thresholds(part["label"].astype(int), part["fracture_prob"].astype(float),
                                                   part["fracture_pred"], part["patient_id"].astype(str),
                                                   n_boot, seed)
            rows.append({"subgroup": column, "value": value, **{k: metrics[k] for k in (
                "n", "n_pos", "auc", "auc_lo", "auc_hi", "sensitivity", "sensitivity_lo", "sensitivity_hi",
                "specificity", "specificity_lo", "specificity_hi")}})
    return pd.DataFrame(rows)


def _with_ci(metrics: dict, name: str) -> str:
    value = metrics.get(name)
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:.3f} [{metrics[f'{name}_lo']:.3f}, {metrics[f'{name}_hi']:.3f}]"


def _evaluation_markdown(result: dict, subgroups: pd.DataFrame) -> str:
    names = ["auc", "sensitivity", "specificity", "ppv", "npv"]
    lines = ["# External validation", "",
             f"{result['n_images']} images of {result['n_patients']} patients were scored; "
             f"{result['n_skipped']} labelled images got no prediction "
             f"({', '.join(f'{n} {r}' for r, n in result['skipped_reasons'].items()) or 'none'}).", ""]
    if "boneage" in result:
        lines += [f"Bone age: MAE {_with_ci(result['boneage'], 'mae')} months on {result['boneage']['n']} images.", ""]
    if "image" not in result:
        return "\n".join(lines)
    lines += [f"Fractures: {result['n_images']} images in {result['n_studies']} studies.",
             "Each image is decided at the threshold its model's training run chose on its own validation "
             "set (nothing is tuned on these images). A study is scored by its most suspicious image and is "
             "positive when any image is. Brackets: 95% intervals from resampling patients.", "",
             "| level | n (positive) | " + " | ".join(n.upper() if len(n) == 3 else n for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for level in ("image", "study"):
        metrics = result[level]
        lines.append(f"| {level} | {metrics['n']} ({metrics['n_pos']}) | "
                     + " | ".join(_with_ci(metrics, n) for n in names) + " |")
    calibration = result["calibration"]
    lines += ["", f"Calibration: Brier {calibration['image']['brier']:.3f} (images), "
                  f"{calibration['study']['brier']:.3f} (studies); ECE {calibration['image']['ece']:.3f} (images).",
              ""]
    if not subgroups.empty:
        lines += ["## Subgroups (images)", "", "| subgroup | value | n (positive) | AUC | sensitivity | specificity |",
                  "|---|---|---|---|---|---|"]
        for row in subgroups.to_dict("records"):
            lines.append(f"| {row['subgroup']} | {row['value']} | {row['n']} ({row['n_pos']}) | "
                         f"{_with_ci(row, 'auc')} | {_with_ci(row, 'sensitivity')} | {_with_ci(row, 'specificity')} |")
        lines.append("")
    lines += ["![ROC](roc.png) ![PR](pr.png) ![reliability](reliability.png)", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Results into the PACS (--dicom-out, --store): per DICOM input a TID 1500 Structured Report and a
# Grad-CAM++ Secondary Capture, filed into the source's study and sent with C-STORE. These objects
# carry the patient's identifiers on purpose (they go back into the record); nothing else does.
# ------------------------------------------------------------------------------------------------

NO_DICOM_SOURCE = "no DICOM source to file the result into"
# A private coding scheme ("99" + a name, DICOM PS3.16 8.2) for values no standard code names:
# this pipeline's calibrated and raw probabilities, its thresholds and its bone-age estimate.
PRIVATE_CODES = "99PEDWRIST"
SERIES_DESCRIPTIONS = {"SR": "AI fracture detection SR, not for diagnostic use",
                       "OT": "AI fracture overlay, not for diagnostic use"}
MANUFACTURER = "pediatric wrist research pipeline"
STORE_TIMEOUT_S = 30  # per network step; a PACS that does not answer in this time is down
STORE_WARNINGS = {0xB000, 0xB006, 0xB007}  # stored, with coercion or elements discarded


def _check_dicom_flags(args) -> None:
    """--dicom-out outside OUT (OUT is the de-identified zone), --store only with --dicom-out."""
    if args.dicom_out and args.dicom_out.resolve().is_relative_to(args.out.resolve()):
        raise common.InputError(f"--dicom-out {args.dicom_out} is inside --out {args.out}, which stays "
                                "de-identified; give a folder outside it")
    if args.store and not args.dicom_out:
        raise common.InputError("--store sends what --dicom-out writes; add --dicom-out DIR")
    _ae_title(args.calling_aet, "--calling-aet")
    if args.store:
        _store_target(args.store)


def _store_target(text: str) -> tuple[str, int, str]:
    """'HOST:PORT:AET' as (host, port, called AE title), or a one-line error."""
    host, port, aet = ([None, None, None] + text.rsplit(":", 2))[-3:]
    if not host or port is None:
        raise common.InputError(f"--store {text}: give HOST:PORT:AET, e.g. pacs.hospital.org:104:PACS")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise common.InputError(f"--store {text}: the port {port!r} is not a number from 1 to 65535")
    return host, int(port), _ae_title(aet, f"--store {text}: the AE title")


def _ae_title(title: str, what: str) -> str:
    if not title.strip() or len(title) > 16 or "\\" in title or not title.isprintable() or not title.isascii():
        raise common.InputError(f"{what} {title!r}: an AE title is 1 to 16 printable ASCII characters, "
                                "no backslash")
    return title


class DicomResults:
    """What --dicom-out files in one run: per source study one new SR series and one new SC
    series, an SC per image while its batch is in memory, the SRs once every value is known."""

    def __init__(self, folder: Path, models: Path, images: pd.DataFrame, hide):
        self.folder, self.models, self.hide = Path(folder), Path(models), hide
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise common.InputError(f"--dicom-out {folder}: cannot create it ({error.strerror})") from None
        images["dicom_out_skip"], images["dicom_out_detail"] = None, None
        self.version = f"code {common.code_fingerprint(main)}"  # 07_predict.py and common.py
        # Series numbers after the modality's own (1, 2, ...), different from one run to the next.
        self.series_number = 9000 + secrets.randbelow(900)
        self.series = {}     # (StudyInstanceUID, modality) -> [series UID, series number, last instance]
        self.filed = {}      # image index -> {"study_uid", "sc", "sr"}
        self.files = []      # the names written, in order: what --store sends
        self.algorithms = {}

    def file_overlays(self, images: pd.DataFrame, indices, squares, boxes, cams, models, device, ages=None) -> None:
        """A Secondary Capture per DICOM image of a batch: its Grad-CAM++ overlay, drawn as --cam
        draws it (the --cam maps when given), with the decision and "not for diagnostic use"."""
        chosen = [i for i, index in enumerate(indices) if common.is_dicom(images.at[index, "path"])]
        if not chosen:
            return
        if cams is None:
            cams = common.deployed_grad_cam(models, squares[chosen], device, None if ages is None else ages[chosen])[0]
        else:
            cams = cams[chosen]
        for i, cam in zip(chosen, cams):
            index = indices[i]
            text = common.caption(float(images.at[index, "fracture_prob"]), float(images.at[index, "threshold"]))
            try:
                overlay = common.render_overlay(images.at[index, "path"], cam, boxes[i],
                                                f"{text} | not for diagnostic use")
                source = _source_header(images.at[index, "path"])
                capture = self._secondary_capture(source, overlay, images.at[index, "laterality"])
                self.filed[index] = {"study_uid": str(source.StudyInstanceUID),
                                     "sc": self._write(capture, f"{index:05d}_sc.dcm")}
            except Exception as error:  # noqa: BLE001 -- one odd header must not stop the run
                self._skip(images, index, "cannot file the result", f"{type(error).__name__}: {error}")

    def file_reports(self, images: pd.DataFrame, boneage_path: Path | None) -> None:
        """An SR per image with a result (the SC's image, or a bone age alone), one per study,
        and DIR/manifest.csv; a PNG or JPEG with a result is a counted skip."""
        rows = []
        has_result = images["fracture_prob"].notna()
        if "bone_age_months" in images:
            has_result |= images["bone_age_months"].notna()
        for index in images.index[has_result & images["dicom_out_skip"].isna()]:
            if not common.is_dicom(images.at[index, "path"]):
                self._skip(images, index, NO_DICOM_SOURCE, "")
                continue
            try:
                source = _source_header(images.at[index, "path"])
                groups = self._image_groups(images.loc[index], source, boneage_path)
                filed = self.filed.setdefault(index, {"study_uid": str(source.StudyInstanceUID)})
                filed["sr"] = self._write(self._report(groups, [source]), f"{index:05d}_sr.dcm")
            except Exception as error:  # noqa: BLE001 -- one odd header must not stop the run
                self._skip(images, index, "cannot file the result", f"{type(error).__name__}: {error}")
                continue
            rows.append({"level": "image", **images.loc[index, ["input_path", "study_id", "laterality"]].to_dict(),
                         "sr_file": filed["sr"], "sc_file": filed.get("sc")})
        rows += self._file_study_reports(images)
        common.write_csv(pd.DataFrame(rows, columns=["level", "input_path", "study_id", "laterality", "sr_file",
                                                     "sc_file"]), self.folder / "manifest.csv")
        common.log(f"07: {len(self.files)} DICOM objects -> {self.hide(self.folder)} (they carry the patient's "
                   "name and IDs, by design)")

    def _skip(self, images: pd.DataFrame, index, reason: str, detail: str) -> None:
        """The image gets nothing in DIR (an SC already written for it is taken back)."""
        images.at[index, "dicom_out_skip"] = f"DICOM out: {reason}"
        images.at[index, "dicom_out_detail"] = " ".join(str(detail).split())
        for name in (self.filed.pop(index, {}).get(kind) for kind in ("sc", "sr")):
            if name:
                (self.folder / name).unlink(missing_ok=True)
                self.files.remove(name)

    def _file_study_reports(self, images: pd.DataFrame) -> list[dict]:
        """One SR per study row of predictions.csv whose images were all filed into one DICOM
        study: the study decision by 07's rule (_study_rows), then each image's group."""
        scored = images[images["fracture_prob"].notna()]
        keyed = study_keys(scored[scored["study_id"].notna()])
        rows = []
        for number, study in enumerate(_study_rows(scored).itertuples()):
            members = keyed.index[(keyed["patient_id"] == study.patient_id) & (keyed["study_id"] == study.study_id)
                                  & (keyed["laterality"] == (study.laterality or ""))]
            filed = [self.filed[index] for index in members if "sr" in self.filed.get(index, {})]
            if not filed:
                continue  # PNGs, or DICOMs counted as skips: nothing to summarise
            if len(filed) < len(members) or len({entry["study_uid"] for entry in filed}) != 1:
                common.log(f"07: study {study.study_id}: its images are not all filed into one DICOM study; "
                           "no study SR")
                continue
            sources = [_source_header(images.at[index, "path"]) for index in members]
            try:
                groups = [self._study_group(study, sources)]
                groups += [self._fracture_group(images.loc[index], source) for index, source in zip(members, sources)]
                name = self._write(self._report(groups, sources), f"study_{number:03d}_sr.dcm")
            except Exception as error:  # noqa: BLE001 -- the images' own SRs are filed already
                common.log(self.hide(f"07: study {study.study_id}: no study SR ({type(error).__name__}: {error})"))
                continue
            rows.append({"level": "study", "study_id": study.study_id, "laterality": study.laterality,
                         "sr_file": name})
        return rows

    def _image_groups(self, image: pd.Series, source, boneage_path: Path | None) -> list:
        groups = [self._fracture_group(image, source)] if pd.notna(image["fracture_prob"]) else []
        if boneage_path is not None and pd.notna(image.get("bone_age_months")):
            groups.append(self._bone_age_group(round(float(image["bone_age_months"]), 1), source, boneage_path))
        return groups

    def _fracture_group(self, image: pd.Series, source):
        """TID 1501: fracture present/absent at the model's threshold, both probabilities and
        both thresholds (predictions.csv's values), the algorithm, the source image."""
        import highdicom as hd
        facts = self._algorithm(image["model"], (image["projection"], int(image["age_group"]),
                                                 float(image["raw_threshold"])))
        probability = _probability_unit()
        present = int(image["fracture_pred"]) == 1
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(),
                                                         identifier=f"wrist fracture, {image['projection']} view"),
            finding_type=_fracture_code(), finding_sites=_wrist(image["laterality"]),
            algorithm_id=hd.sr.AlgorithmIdentification(name=facts["arch"], version=self.version,
                                                       parameters=facts["parameters"]),
            measurements=[
                hd.sr.Measurement(_private("fracture-prob", "Fracture probability (calibrated)"),
                                  float(image["fracture_prob"]), probability),
                hd.sr.Measurement(_private("raw-prob", "Fracture probability (model output)"),
                                  float(image["raw_prob"]), probability),
                hd.sr.Measurement(_private("threshold", "Decision threshold (calibrated)"),
                                  float(image["threshold"]), probability),
                hd.sr.Measurement(_private("raw-threshold", "Decision threshold (model output)"),
                                  float(image["raw_threshold"]), probability)],
            qualitative_evaluations=[_fracture_finding(present)],
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)])

    def _bone_age_group(self, months: float, source, boneage_path: Path):
        import highdicom as hd
        from pydicom.sr.codedict import codes
        facts = self._algorithm(boneage_path.relative_to(self.models).as_posix())
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="bone age"),
            algorithm_id=hd.sr.AlgorithmIdentification(name=facts["arch"], version=self.version,
                                                       parameters=facts["parameters"]),
            measurements=[hd.sr.Measurement(_private("bone-age", "Bone age (model estimate)"), months,
                                            codes.UCUM.Month)],
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)])

    def _study_group(self, study, sources: list):
        import highdicom as hd
        probability = _probability_unit()
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"wrist fracture, study of "
                                                                                  f"{len(sources)} images"),
            finding_type=_fracture_code(), finding_sites=_wrist(study.laterality),
            algorithm_id=hd.sr.AlgorithmIdentification(name="07 study rule", version=self.version, parameters=[
                "study probability: the highest of its images", "fracture present when any image is positive "
                "at its own model's threshold (AP and Lat models have different thresholds)"]),
            measurements=[
                hd.sr.Measurement(_private("study-prob", "Study fracture probability (calibrated, max)"),
                                  float(study.fracture_prob), probability),
                hd.sr.Measurement(_private("study-raw-prob", "Study fracture probability (model output, max)"),
                                  float(study.raw_prob), probability)],
            qualitative_evaluations=[_fracture_finding(int(study.fracture_pred) == 1)],
            source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(s) for s in sources])

    def _algorithm(self, relative: str, decision: tuple | None = None) -> dict:
        """Architecture, file hashes and, for a fracture group's deployment (`decision`: projection,
        age group, raw threshold), its arm and threshold rule: read once per run. `relative` is
        predictions.csv's `model`, two files joined by '+' when 04 deployed their mean."""
        if relative not in self.algorithms:
            paths = relative.split("+")
            arches = [common.load_checkpoint(self.models / path)["arch"] for path in paths]
            parameters = [text for path in paths
                          for text in (f"model file {path}", f"model sha256 {_sha256(self.models / path)}")]
            if decision is not None:
                projection, group, threshold = decision
                deployed = _deployment_row(self.models, projection, group)
                arm = deployed.get("deployed") or "the group's own model"
                rule = deployed.get("threshold_source") or "Youden's J on validation"
                parameters += [f"deployed for {projection} age group {group}: {arm}"
                               + (" (the mean of the models' probabilities)" if len(paths) > 1 else ""),
                               f"decision: fracture when the model output >= {threshold:.4f} (chosen by {rule}); "
                               "the calibrated threshold gives the same decision",
                               f"calibration: {deployed.get('calibration_source') or 'own'}, fitted on validation"]
                if arm == "conditioned":
                    parameters.append("age input: the patient's age, or without one the age router's expected age")
            self.algorithms[relative] = {"arch": "+".join(dict.fromkeys(arches)), "parameters": parameters}
        return self.algorithms[relative]

    def _report(self, groups: list, sources: list):
        """A Comprehensive 3D SR holding a TID 1500 Measurement Report, in the sources' study."""
        import highdicom as hd
        from highdicom.coding_schemes import CodingSchemeIdentificationItem
        from pydicom.sr.codedict import codes
        from pydicom.uid import ExplicitVRLittleEndian, generate_uid
        device = hd.sr.DeviceObserverIdentifyingAttributes(  # the same UID for the same code version
            uid=generate_uid(entropy_srcs=[MANUFACTURER, self.version]), name="pediatric wrist fracture detection",
            manufacturer_name=MANUFACTURER)
        context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device))
        content = hd.sr.MeasurementReport(observation_context=context, procedure_reported=codes.SCT.PlainRadiography,
                                          imaging_measurements=groups)
        series_uid, series_number, instance = self._next_instance(str(sources[0].StudyInstanceUID), "SR")
        with _person_names_unlogged():
            return hd.sr.Comprehensive3DSR(
                evidence=sources, content=content, series_instance_uid=series_uid, series_number=series_number,
                sop_instance_uid=hd.UID(), instance_number=instance, manufacturer=MANUFACTURER, is_complete=True,
                series_description=SERIES_DESCRIPTIONS["SR"], manufacturer_model_name="07_predict.py",
                software_versions=self.version, content_qualification="RESEARCH",
                coding_schemes=[CodingSchemeIdentificationItem(PRIVATE_CODES, name=f"{MANUFACTURER} values")],
                transfer_syntax_uid=ExplicitVRLittleEndian)

    def _secondary_capture(self, source, overlay: np.ndarray, laterality):
        import highdicom as hd
        from pydicom.uid import ExplicitVRLittleEndian
        series_uid, series_number, instance = self._next_instance(str(source.StudyInstanceUID), "OT")
        with _person_names_unlogged():
            capture = hd.sc.SCImage.from_ref_dataset(
                source, np.ascontiguousarray(overlay), "RGB", 8, "PATIENT", series_instance_uid=series_uid,
                series_number=series_number, sop_instance_uid=hd.UID(), instance_number=instance,
                manufacturer=MANUFACTURER, laterality=laterality or None,
                # highdicom asks for an orientation; the overlay keeps the source's rows and columns
                # (a caption banner above), so it takes the source's value, set below, even empty.
                patient_orientation=("L", "F"), series_description=SERIES_DESCRIPTIONS["OT"],
                manufacturer_model_name="07_predict.py", software_versions=self.version,
                content_qualification="RESEARCH", transfer_syntax_uid=ExplicitVRLittleEndian)
        capture.PatientOrientation = source.get("PatientOrientation", "")
        if "Laterality" not in capture:
            capture.Laterality = ""  # Type 2C: known to be unknown
        capture.BurnedInAnnotation = "YES"  # the caption (no identifier in it)
        return capture

    def _next_instance(self, study_uid: str, modality: str) -> tuple[str, int, int]:
        """(series UID, series number, instance number): one new series per study and kind."""
        import highdicom as hd
        number = self.series_number + (modality == "OT")
        entry = self.series.setdefault((study_uid, modality), [hd.UID(), number, 0])
        entry[2] += 1
        return entry[0], entry[1], entry[2]

    def _write(self, dataset, name: str) -> str:
        """Atomically: --store must never send a half-written file of a crashed run."""
        with common.atomic_path(self.folder / name) as tmp:
            dataset.save_as(tmp, enforce_file_format=True)
        if name not in self.files:
            self.files.append(name)
        return name


@contextlib.contextmanager
def _person_names_unlogged():
    """highdicom warns about a one-part person name (a ReferringPhysicianName 'WARD') and quotes
    it: no name from the source may reach the log."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The string .* person name")
        yield


def _source_header(path: Path):
    """The source's header without pixels, with the patient and study attributes highdicom copies
    present: empty where the source has none (DICOM allows them empty, Type 2)."""
    import pydicom
    header = pydicom.dcmread(path, stop_before_pixels=True)
    for keyword in ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if not header.get(keyword):
            raise ValueError(f"the DICOM header has no {keyword}")
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                    "StudyDate", "StudyTime", "ReferringPhysicianName"):
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def _private(value: str, meaning: str):
    from highdicom.sr import CodedConcept
    return CodedConcept(value, PRIVATE_CODES, meaning)


def _probability_unit():
    from highdicom.sr import CodedConcept
    return CodedConcept("{probability}", "UCUM", "probability")


def _fracture_code():
    from highdicom.sr import CodedConcept
    return CodedConcept("72704001", "SCT", "Fracture")  # the morphologic abnormality


def _fracture_finding(present: bool):
    import highdicom as hd
    from pydicom.sr.codedict import codes
    return hd.sr.QualitativeEvaluation(_fracture_code(), codes.SCT.Present if present else codes.SCT.Absent)


def _wrist(laterality) -> list:
    import highdicom as hd
    from pydicom.sr.codedict import codes
    side = {"L": codes.SCT.Left, "R": codes.SCT.Right}.get(laterality or "")
    return [hd.sr.FindingSite(codes.SCT.WristJoint, laterality=side)]


def _sha256(path: Path) -> str:
    import hashlib
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _deployment_row(models: Path, projection: str, group: int) -> dict:
    """04's summary.csv row of the group: the arm it deployed, how it chose the threshold (a small
    group borrows the pooled model's) and the calibration map; {} without one."""
    summary = models / "fracture" / "summary.csv"
    if not summary.is_file():
        return {}
    rows = pd.read_csv(summary, dtype=str, keep_default_na=False)
    match = rows[(rows["kind"] == "model") & (rows["projection"] == projection) & (rows["age_group"] == str(group))]
    return match.iloc[0].to_dict() if len(match) else {}


def store_results(results: DicomResults, target: tuple[str, int, str], calling_aet: str) -> None:
    """C-STORE every file this run wrote, over one association; DIR/store_report.csv says per file
    what was stored. Whatever fails, the files stay in DIR for the next try."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Comprehensive3DSRStorage, SecondaryCaptureImageStorage
    host, port, called = target
    where, kept = f"{host}:{port}:{called}", f"the files stay in {results.hide(results.folder)}"
    if not results.files:
        common.log(f"07: --store {where}: nothing was written to send")
        return
    entity = AE(ae_title=calling_aet)
    for sop_class in (Comprehensive3DSRStorage, SecondaryCaptureImageStorage):
        entity.add_requested_context(sop_class, ExplicitVRLittleEndian)
    entity.acse_timeout = entity.dimse_timeout = entity.network_timeout = STORE_TIMEOUT_S
    # pynetdicom reports a refused TCP connection and a server that hangs up on the request (as a
    # busy Orthanc refusing an AE title sometimes does, before its A-ASSOCIATE-RJ is read) alike,
    # as an abort: whether the connection opened tells the two apart.
    connected = []
    association = entity.associate(host, port, ae_title=called,
                                   evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: connected.append(True))])
    if not association.is_established:
        problem = (f"the server refused the association (does it know the calling AE title {calling_aet}?)"
                   if connected else "no DICOM server answered there")
        raise common.InputError(f"--store {where}: {problem}; nothing was sent, {kept}")
    rows = []
    try:
        for name in results.files:
            row = {"file": name, **_store_one(association, results.folder / name)}
            common.log(f"07: {row['status']} {name}" + (f" ({row['detail']})" if row["detail"] else ""))
            rows.append(row)
    finally:
        association.release()
    report = common.write_csv(pd.DataFrame(rows, columns=["file", "status", "detail"]),
                              results.folder / "store_report.csv")
    failed = sum(row["status"] != "stored" for row in rows)
    if failed:
        raise common.InputError(f"--store {where}: {failed} of {len(rows)} files not stored (see "
                                f"{results.hide(report)}); {kept}")
    common.log(f"07: stored {len(rows)} files into {where}")


def _store_one(association, path: Path) -> dict:
    try:
        status = association.send_c_store(path)
    except Exception as error:  # noqa: BLE001 -- e.g. no accepted presentation context for the file
        return {"status": "failed", "detail": " ".join(f"{type(error).__name__}: {error}".split())}
    if "Status" not in status:
        return {"status": "failed", "detail": "no answer (association lost or timed out)"}
    code = int(status.Status)
    if code == 0:
        return {"status": "stored", "detail": ""}
    comment = f": {status.ErrorComment}" if "ErrorComment" in status else ""
    return {"status": "stored" if code in STORE_WARNINGS else "failed", "detail": f"status 0x{code:04X}{comment}"}



if __name__ == "__main__":
    main()
