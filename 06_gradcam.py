"""Stage 06: Grad-CAM++ overlays showing where each fracture model looks, on its test images.

For every age group's deployed model (04's choice on validation: the pooled model, the
age-conditioned one, the group's own, or the mean of the pooled and own, whose maps are averaged
as their probabilities are), the test images it scores (its projection and age group) are
explained with Grad-CAM++ (Chattopadhay et al. 2018) for the fracture logit, computed in fp32 on
the unwrapped model (an age-conditioned one given each image's true age). The map is drawn on the
ORIGINAL image (the letterbox padding is cut off and the map stretched back to the image's own
height and width), captioned with the probability, the deployment's validation-chosen threshold,
the label and the outcome (TP/FP/FN/TN). Errors are shown first: true positives, false positives
and false negatives in turn, then true negatives.

Reads   OUT/fracture/{AP,Lat}/group{g}/deployed.json, the best.pt files it names and
        OUT/fracture/test_predictions.csv (from 04),
        OUT/splits/wrist_test.csv (01: where each test image lies)
Writes  OUT/gradcam/{AP,Lat}/group{g}/<filestem>_p{prob:.2f}_y{label}.png   one overlay per image
        OUT/gradcam/{AP,Lat}/group{g}/grid.png   the first overlays of that model side by side
        OUT/gradcam/index.csv   projection, age_group, filestem, label, prob, threshold, outcome,
                                overlay (path relative to OUT)
        OUT/gradcam/config.json

Run:
  python 06_gradcam.py                                   # demo outputs, 6 images per model
  python 06_gradcam.py --data DATA --preset full         # every test image of every model, GPU
  python 06_gradcam.py --max-per-model 2 --device cpu    # CPU smoke test
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

import common

MAX_PER_MODEL = {"demo": 6, "full": 0}   # 0 = every test image of the model
GRID_TILES = 24
OUTCOME_ORDER = ["TP", "FP", "FN", "TN"]


def parse_args(argv=None):
    parser = common.make_parser(__doc__)
    parser.add_argument("--max-per-model", type=int, default=None,
                        help="overlays per model, errors first; 0 = all (default: 6 in the demo "
                             "preset, all in the full preset)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="images per Grad-CAM++ pass (default: 8)")
    args = common.resolve_common_args(parser.parse_args(argv))
    if args.max_per_model is None:
        args.max_per_model = MAX_PER_MODEL[args.preset]
    if args.max_per_model < 0 or args.batch_size < 1:
        parser.error("--max-per-model must be >= 0 and --batch-size >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    common.import_torch()
    predictions = _read_test_predictions(args.out)
    deployments = common.fracture_models(args.out / "fracture")
    if not deployments:
        raise common.InputError(f"{args.out / 'fracture'}: no trained fracture model (best.pt); run "
                                "04_train_fracture_ddp.py with the same --out first")
    out_dir = common.ensure_writable_dir(args.out / "gradcam")
    device = common.resolve_device(args.device)
    rows, unreadable = [], 0
    for (projection, group), deployed in deployments.items():
        models = [common.load_trained_model(path, device) for path in deployed["paths"]]
        checkpoint = models[-1][1]
        threshold = float(deployed["threshold"])
        chosen = choose_images(_images_of_model(predictions, projection, group, checkpoint.get("route", "true")),
                               threshold, args.max_per_model)
        model_dir = out_dir / projection / f"group{group}"
        common.log(f"{projection} group {group}: Grad-CAM++ on {len(chosen)} test images "
                   f"({', '.join(f'{n} {o}' for o, n in chosen['outcome'].value_counts().items())}), "
                   f"threshold {threshold:.2f}")
        tiles = []
        batches = [chosen.iloc[i:i + args.batch_size] for i in range(0, len(chosen), args.batch_size)]
        for batch in common.progress(batches, desc=f"{projection} group {group}", unit="batch"):
            squares, boxes, readable = _load_batch(batch, checkpoint["image_size"])
            unreadable += len(batch) - len(readable)
            if not readable:
                continue
            # An age-conditioned model is given each image's true age, as 04 scored it here.
            cams, probs = common.deployed_grad_cam(models, np.stack(squares), device, [row.age for row in readable])
            for row, cam, box, prob in zip(readable, cams, boxes, probs):
                # The outcome is re-read from this fp32 pass, so caption, name and colour agree.
                outcome = outcome_of(row.label, prob, threshold)
                overlay = common.render_overlay(row.image_path, cam, box,
                                                common.caption(prob, threshold, label=row.label, outcome=outcome))
                path = model_dir / f"{row.filestem}_p{prob:.2f}_y{int(row.label)}.png"
                common.write_png(overlay, path)
                rows.append({"projection": projection, "age_group": group, "filestem": row.filestem,
                             "label": int(row.label), "prob": float(prob),
                             "threshold": threshold, "outcome": outcome,
                             "overlay": path.relative_to(args.out).as_posix()})
                if len(tiles) < GRID_TILES:
                    tiles.append((_thumbnail(overlay), f"{outcome} p={prob:.3f}"))
        _remove_stale_overlays(model_dir, {args.out / r["overlay"] for r in rows})
        if tiles:
            _save_grid(tiles, model_dir / "grid.png",
                       f"Grad-CAM++ {projection} group {group} (threshold {threshold:.3f})")
        del models
    index = pd.DataFrame(rows, columns=["projection", "age_group", "filestem", "label", "prob",
                                        "threshold", "outcome", "overlay"])
    common.write_csv(index, out_dir / "index.csv")
    common.write_run_config(out_dir, args)
    skipped = f", {unreadable} unreadable image(s) skipped" if unreadable else ""
    common.log(f"Grad-CAM++: {len(index)} overlays from {len(deployments)} deployed models{skipped} -> {out_dir}")


def _read_test_predictions(out: Path) -> pd.DataFrame:
    """04's test predictions joined with the image paths of 01's test split."""
    path = out / "fracture" / "test_predictions.csv"
    if not path.is_file():
        raise common.InputError(f"{path}: not found; run 04_train_fracture_ddp.py with the same "
                                "--out first")
    predictions = pd.read_csv(path, dtype={"filestem": str})
    test = common.read_split(out, "wrist", "test")[["filestem", "image_path"]]
    return predictions.merge(test, on="filestem", how="inner")


def _images_of_model(predictions: pd.DataFrame, projection: str, group: int, route: str) -> pd.DataFrame:
    """The test images a group's deployed model scored: its projection, routed to its age group as in 04."""
    group_column = "age_group" if route == "true" else "age_group_pred"
    mine = predictions[(predictions["projection_name"] == projection) & (predictions[group_column] == group)]
    return mine.rename(columns={f"prob_route_{route}": "prob"}).dropna(subset=["prob"])


def choose_images(frame: pd.DataFrame, threshold: float, limit: int) -> pd.DataFrame:
    """Errors and hits first: TP, FP, FN in turn (most telling first), then TN; `limit` rows (0 = all).

    The most telling image of each kind: the surest TP and FP (highest probability) and the
    clearest miss (lowest probability for a fracture). Interleaving the three kinds keeps a short
    list from being all true positives, which is what a reader of the maps needs to judge.
    """
    frame = frame.copy()
    frame["outcome"] = [outcome_of(y, p, threshold) for y, p in zip(frame["label"], frame["prob"])]
    frame["surety"] = np.where(frame["outcome"].isin(["TP", "FP"]), frame["prob"], -frame["prob"])
    frame = frame.sort_values(["surety", "filestem"], ascending=[False, True])
    frame["rank"] = frame.groupby("outcome").cumcount()
    frame["order"] = frame["outcome"].map(OUTCOME_ORDER.index)
    frame["is_tn"] = frame["outcome"].eq("TN")
    frame = frame.sort_values(["is_tn", "rank", "order"], kind="stable")
    chosen = frame if limit == 0 else frame.head(limit)
    return chosen.drop(columns=["surety", "rank", "order", "is_tn"]).reset_index(drop=True)


def outcome_of(label: int, prob: float, threshold: float) -> str:
    predicted = prob >= threshold
    return ("TP" if predicted else "FN") if int(label) == 1 else ("FP" if predicted else "TN")


def _load_batch(batch: pd.DataFrame, size: int):
    """Preprocess each image exactly as in training; an image that cannot be read is left out."""
    squares, boxes, readable = [], [], []
    for row in batch.itertuples(index=False):
        try:
            square, box = common.preprocess_image(Path(row.image_path), size)
        except (common.ImageReadError, OSError) as error:
            common.log(f"skipped: {error}")
            continue
        squares.append(square)
        boxes.append(box)
        readable.append(row)
    return squares, boxes, readable


def _remove_stale_overlays(model_dir: Path, written: set[Path]) -> None:
    """Delete overlays of an earlier run (other probabilities give other names) so the folder
    holds exactly what index.csv lists."""
    for path in model_dir.glob("*_p*_y*.png"):
        if path not in written:
            path.unlink()


def _thumbnail(rgb: np.ndarray, side: int = 320) -> np.ndarray:
    import cv2
    shrink = min(1.0, side / max(rgb.shape[:2]))
    if shrink == 1.0:
        return rgb
    return cv2.resize(rgb, (round(rgb.shape[1] * shrink), round(rgb.shape[0] * shrink)),
                      interpolation=cv2.INTER_AREA)


def _save_grid(tiles: list[tuple[np.ndarray, str]], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    columns = min(6, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.3 * columns, 3.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, label) in zip(axes.flat, tiles):
        ax.imshow(image)
        ax.set_title(label, fontsize=8)
    fig.suptitle(title, fontsize=10)
    return common.save_figure(fig, path)


if __name__ == "__main__":
    main()
