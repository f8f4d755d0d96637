"""Stage 07: fracture probability (and optionally bone age) for new radiographs: what a hospital runs.

INPUT is any mix of
  a folder      every .png/.jpg/.jpeg/.dcm under it, recursively (and extension-less DICOM files)
  a CSV         column `image_path` (or `path`); optional `projection` (AP/Lat), `age` (years),
                `sex` (M/F), `patient_id`, `study_id`, `laterality` (L/R), and the labels
                `fracture` (0/1) and `boneage` (months); relative paths are read from the CSV's folder
  image files   PNG/JPEG (8 or 16 bit) or DICOM, any transfer syntax (JPEG, JPEG-LS, JPEG 2000, RLE)

Each image gets (common.resolve_prediction_metadata reads the CSV row and the DICOM header)
  its projection  from the CSV, else the DICOM's ViewPosition, else its ViewCodeSequence, else
                  --projection; with none it is a counted skip
  its age group   from its age (CSV, else the DICOM's PatientAge, else --age) with the age edges
                  stored in the models; with no age, predicted by the age router of 03
  a fracture probability from the model 04 trained for that projection and age group, and a 0/1
                  prediction at that model's threshold (chosen on validation in 04).
                  fracture_prob is calibrated (the Platt map 04 fitted on validation), raw_prob
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
predictions are also scored against it (common.evaluate_predictions, the metric code of 04's test
evaluation): image- and study-level AUC, sensitivity, specificity, PPV, NPV with patient-bootstrap
95% CIs at the stored thresholds, calibration, subgroups, ROC/PR/reliability figures; with
`boneage` and --boneage also the MAE.

Nothing identifying is written: no names, IDs or birth dates. Of the DICOM header only the view,
age, sex and laterality are read, and the Study Instance UID only as a keyed hash whose key is
random per run and never stored (common.study_key). Files straight from a PACS are often named
by their SOP Instance UID, in folders named by Study/Series UID: every path component that looks
like a UID (1.2.840.113619.2.55.3.604688.12345.dcm) is written as uid-<the same keyed hash>
(common.hide_uids) in every output file, file name and log line, config.json's record of the
inputs included; so is a CSV study_id that is a UID.

Reads   MODELS/fracture/{AP,Lat}/group{g}/best.pt (04); MODELS/age/best.pt (03, for images
        without an age); MODELS/boneage/best.pt (05, with --boneage)
Writes  OUT/predictions.csv  level (image/study), input_path, study_id, laterality, projection,
                             projection_source (csv/dicom/flag), age_group, age_group_name,
                             age_group_source (given/predicted), fracture_prob, raw_prob, fracture_pred,
                             threshold, model, n_images; bone_age_months (--boneage); cam_path (--cam)
        OUT/skipped.csv      input_path, reason, detail: every image left out and why
        OUT/gradcam/         Grad-CAM++ overlays (--cam), drawn as in 06_gradcam.py
        OUT/evaluation.json, EVALUATION.md, subgroups.csv, roc.png, pr.png, reliability.png
                             (a CSV with `fracture`): {"image": {...}, "study": {...}, "n_images", ...}
        OUT/config.json

Run:
  python 07_predict.py new_images/                        # models from outputs/, CSV to outputs/predictions/
  python 07_predict.py worklist.csv --models wrist_models/ --out results/
  python 07_predict.py scan.dcm --age 11 --cam --device cpu
  python 07_predict.py hands/ --projection AP --sex F --boneage
  python 07_predict.py hands/ --sex F --boneage --models bone_age_run/   # a run with only 05's model
  python 07_predict.py hospital_table.csv --models outputs --out external/   # external validation
"""
from __future__ import annotations

import argparse
import functools
import secrets
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

import common

SKIPS_SHOWN = 20


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
    args = parser.parse_args(argv)
    if args.age is not None and not 0 <= args.age < 30:
        parser.error(f"--age {args.age:g}: give the age in years (0 to 30)")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    args.out = args.out or args.models / "predictions"
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
    hide = functools.partial(common.hide_uids, salt=salt)
    images = common.collect_prediction_inputs(args.inputs)
    # Written UID-free (a CSV's study_id may be a Study Instance UID too); `path` is the file read.
    images[["input_path", "study_id"]] = images[["input_path", "study_id"]].map(hide, na_action="ignore")
    common.log(f"07: {len(images)} input images; models from {hide(args.models)}")
    common.resolve_prediction_metadata(images, salt, projection=args.projection, age=args.age, sex=args.sex)
    if fracture_models:
        assign_age_groups(images, edges, args.models / "age" / "best.pt", args, device)
        predict_fractures(images, fracture_models, edges, args, device, out_dir)
    else:
        common.log(f"07: no fracture models under {hide(args.models / 'fracture')}: bone age only")
        _no_fracture_track(images)
    if args.boneage:
        predict_bone_age(images, boneage_path, args, device)

    predicted = images["fracture_prob"].notna()
    if args.boneage:
        predicted |= images["bone_age_months"].notna()
    table = pd.concat([_image_rows(images[predicted], edges, args), _study_rows(images[predicted])],
                      ignore_index=True).reindex(columns=_output_columns(args))
    common.write_csv(table, out_dir / "predictions.csv")
    skipped = _skip_table(images, hide)
    common.write_csv(skipped, out_dir / "skipped.csv")
    if images["label"].notna().any() or images["boneage"].notna().any():
        common.evaluate_predictions(images, skipped, edges, out_dir, n_boot=args.bootstrap, hide=hide)
    common.write_run_config(out_dir, args, hide=hide, models=str(args.models.resolve()))
    _print_summary(table, skipped, out_dir, hide)
    return table


def _no_fracture_track(images: pd.DataFrame) -> None:
    """The fracture columns, empty, for a run that trained only the bone-age model; the images
    are not listed as fracture skips (there was nothing to predict)."""
    for column in ("age_group", "age_group_source", "fracture_prob", "raw_prob", "fracture_pred", "threshold",
                   "model", "cam_path"):
        images[column] = None
    no_projection = images["skip_reason"] == "no projection"
    images.loc[no_projection, ["skip_reason", "skip_detail"]] = None


def _age_edges(fracture_models: dict) -> tuple[float, ...]:
    """The age edges the fracture models were trained with (each checks it agrees when loaded)."""
    checkpoint = common.load_checkpoint(next(iter(fracture_models.values())))
    return tuple(float(e) for e in checkpoint["age_edges"])


def assign_age_groups(images: pd.DataFrame, edges, router_path: Path, args, device) -> None:
    """The group of a given age with the models' edges; otherwise the 03 router's prediction."""
    images["age_group"], images["age_group_source"] = None, None
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
            common.skip_image(images, index, "no age and no age router", f"{router_path} not found: "
                              "give an age (CSV column, --age) or run 03_train_age.py")
        return
    router, checkpoint = common.load_trained_model(router_path, device)
    _check_edges(checkpoint, edges, router_path)
    for indices, squares, _ in _batches(images, unknown, checkpoint["image_size"], args.batch_size,
                                        "age router", common.skip_image):
        images.loc[indices, "age_group"] = _infer(router, squares, device).argmax(dim=1).tolist()
        images.loc[indices, "age_group_source"] = "predicted"


def _check_edges(checkpoint: dict, edges, path: Path) -> None:
    if tuple(float(e) for e in checkpoint.get("age_edges", ())) != tuple(edges):
        raise common.InputError(f"{path}: trained with age edges {checkpoint.get('age_edges')}, the other "
                                f"models with {list(edges)}; retrain all models from one run")


def _batches(images: pd.DataFrame, indices, size: int, batch_size: int, desc: str, skip):
    """Yield (indices, uint8 [B, S, S] squares, letterboxes) of the readable images, batch by batch.

    Preprocessing is common.preprocess_image, the function training used; an image that cannot be
    decoded is recorded with `skip` (common.skip_image or _skip_bone_age) and never reaches a model.
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
                      ) -> None:
    """Run each (projection, age group) model on its images; with --cam also write Grad-CAM++
    overlays (common's, as 06 draws them)."""
    import torch
    for column in ("fracture_prob", "raw_prob", "fracture_pred", "threshold", "model", "cam_path"):
        images[column] = None
    ready = images[images["skip_reason"].isna() & images["age_group"].notna()]
    for (projection, group), members in ready.groupby(["projection", "age_group"]):
        group = int(group)
        model_path = fracture_models.get((projection, group))
        if model_path is None:
            for index in members.index:
                common.skip_image(images, index, "no fracture model for the group",
                                  _missing_model_detail(args.models, projection, group, edges))
            continue
        model, checkpoint = common.load_trained_model(model_path, device)
        _check_edges(checkpoint, edges, model_path)
        threshold = float(checkpoint.get("threshold", 0.5))
        relative = model_path.relative_to(args.models).as_posix()
        for indices, squares, boxes in _batches(images, members.index, checkpoint["image_size"],
                                                args.batch_size, f"{projection} group {group}",
                                                common.skip_image):
            probs = torch.sigmoid(_infer(model, squares, device)[:, 0]).numpy().astype(float)
            calibration = checkpoint.get("calibration")
            images.loc[indices, "fracture_prob"] = common.apply_calibration(probs, calibration)
            images.loc[indices, "raw_prob"] = probs
            images.loc[indices, "fracture_pred"] = (probs >= threshold).astype(int)  # as 04 decided
            images.loc[indices, "threshold"] = float(common.apply_calibration([threshold], calibration)[0])
            images.loc[indices, "model"] = relative
            if args.cam:
                cams, _ = common.grad_cam_plus_plus(model, squares, device)
                for index, cam, box, prob in zip(indices, cams, boxes, probs):
                    stem = Path(images.at[index, "input_path"]).stem  # the UID-free name
                    name = f"{index:05d}_{stem}_p{prob:.2f}.png"
                    overlay = common.render_overlay(images.at[index, "path"], cam, box,
                                                     common.caption(float(prob), threshold))
                    common.write_png(overlay, out_dir / "gradcam" / name)
                    images.at[index, "cam_path"] = f"gradcam/{name}"
        del model


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
    readable = ~images["skip_reason"].isin(common.IMAGE_PROBLEMS)
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


def _image_rows(images: pd.DataFrame, edges, args) -> pd.DataFrame:
    names = common.age_group_names(edges) if edges is not None else []
    rows = images[["input_path", "study_id", "laterality", "projection", "projection_source", "age_group",
                   "age_group_source", "fracture_prob", "raw_prob", "fracture_pred", "threshold", "model"]].copy()
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
    scored = common.study_keys(images[images["study_id"].notna() & images["fracture_prob"].notna()])
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
            "model", "n_images", *(["bone_age_months"] if args.boneage else []),
            *(["cam_path"] if args.cam else [])]


def _skip_table(images: pd.DataFrame, hide) -> pd.DataFrame:
    """Every skip with its reason; the details (error messages may quote the path) through `hide`."""
    frames = [images.loc[images["skip_reason"].notna(), ["input_path", "skip_reason", "skip_detail"]]
              .set_axis(["input_path", "reason", "detail"], axis=1)]
    if "boneage_skip" in images:
        bone = images[images["boneage_skip"].notna()]
        frames.append(pd.DataFrame({"input_path": bone["input_path"], "reason": bone["boneage_skip"],
                                    "detail": bone["boneage_detail"]}))
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


if __name__ == "__main__":
    main()
