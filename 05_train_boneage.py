"""Stage 05: train the bone-age regressor (hand radiograph + sex -> bone age in months).

Reads   OUT/splits/boneage_{train,val,test}.csv  (01/02: id, boneage, male, sex, image_path, ...)
        and the images they name, decoded once into OUT/cache/boneage_<size>.npy
Writes  OUT/boneage/best.pt, last.pt, history.csv, sample_audit.json   the model (resumable)
        OUT/boneage/predictions.csv   id, sex, true_months, predicted_months (test set)
        OUT/boneage/metrics.json      {"val": {"mae", "n"}, "test": {"mae", "mae_ci", "n",
                                       "baseline_mae", "rmse", "r2", "bias" (predicted - true),
                                       each with _lo/_hi, "by_sex": {...}, "by_age_band": {...}}}
        OUT/boneage/scatter.png, bland_altman.png, curves.png, config.json

The model: timm backbone features (features_only: no unused parameters, so DDP works on any
number of ranks) -> GeM pooling of softplus(features) with a learnable exponent bounded to (1, 6)
-> concatenated sex embedding -> MLP head -> sigmoid x 240, so every prediction lies between 0 and
240 months. Any family 03/04 offer works (ResNet, ConvNeXt, ConvNeXtV2, Swin at its --image-size). Sex is an input because
bone maturation differs by sex. Loss: mean absolute error in months, the metric the RSNA challenge
reports; baseline_mae is the error of always predicting the training mean, the figure a model has
to beat. mae_ci is a 95% bootstrap interval over images (one image per child in RSNA).

Augmentation (small affine, flip, brightness/contrast) runs on whole training batches on the
device; validation, test and 07_predict see the same preprocessing (common.preprocess_image via
the cache) and no augmentation. bf16 autocast on CUDA; plain fp32 on CPU.

Presets: full = ConvNeXt-Tiny at 512 px, batch 32, lr 1e-4, up to 40 epochs; give it ImageNet
weights with --pretrained. demo = ConvNeXt-Atto at 96 px from random init, 10 epochs. Measured on
the default demo (1,149 train / 288 val / 163 test hands): test MAE 12.3 months against 35.1 for
predicting the training mean, in 200 s of CPU time on one core. resnet10t (--arch resnet10t)
learned more (7.9 against 35.7, 14 epochs) at 1.6x the CPU time per epoch, too slow for the
demo's 3-minute budget.

Run (after 01_split_test.py and 02_split_trainval.py with the same --out):
  python 05_train_boneage.py                                      # demo splits, demo preset, CPU
  python 05_train_boneage.py --preset full --pretrained convnext_tiny.safetensors     # one GPU
  python -m torch.distributed.run --nproc-per-node 4 05_train_boneage.py --preset full \\
      --pretrained convnext_tiny.safetensors --compile                                # 4 GPUs
  python 05_train_boneage.py --epochs 1 --image-size 32 --device cpu    # CPU smoke test
  python -m torch.distributed.run --nproc-per-node 2 --max-restarts 1 05_train_boneage.py \
      --device cpu --arch test_convnext --image-size 32 --epochs 2      # 2 CPU ranks (gloo)
A run stopped part way (crash, preemption) resumes from last.pt when rerun with the same code,
data and settings; --force trains from scratch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

import common

PRESETS = {
    # Demo: the same ConvNeXt family as the full preset, small enough to learn the demo hands
    # within ~3 minutes on two CPU cores (figures above). Full: ConvNeXt-Tiny with ImageNet
    # weights, as the 2025 sex-aware model (3.68 months on RSNA).
    "demo": {"arch": "convnext_atto", "epochs": 10, "batch_size": 32, "lr": 2e-3, "patience": 5},
    "full": {"arch": "convnext_tiny", "epochs": 40, "batch_size": 32, "lr": 1e-4, "patience": 5},
}
# The bone-age test metrics are also given per band of years, the wrist models' default age groups.
DEFAULT_AGE_EDGES = (5.0, 10.0, 15.0)
BONEAGE_IMAGE_SIZE = {"demo": 96, "full": 512}
SPLITS = ("train", "val", "test")
REQUIRED_COLUMNS = ["id", "boneage", "male", "image_path"]


def parse_args(argv=None):
    parser = common.add_training_args(common.make_parser(__doc__))
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for CIs (default: 1000)")
    args = common.resolve_common_args(parser.parse_args(argv))
    common.apply_training_preset(args, PRESETS, BONEAGE_IMAGE_SIZE[args.preset])
    for flag in ("epochs", "batch_size", "patience", "image_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give a positive number")
    return args


def main(argv=None):
    args = parse_args(argv)
    common.import_torch()
    out_dir = common.ensure_writable_dir(args.out / "boneage")
    # Every input is checked before the process group starts, so a bad file stops every rank the
    # same way instead of leaving the others waiting in a collective.
    frames = {split: read_boneage_split(args.out, split) for split in SPLITS}
    common.assert_no_patient_leak(frames, key="id")
    common.check_training_args(args)
    mlflow = common.start_mlflow(args, "boneage") if args.mlflow else None
    if args.preset == "full" and args.pretrained is None:
        common.log(f"note: no --pretrained, so {args.arch} starts from random weights; from a few "
                   "thousand hands it learns far less than from ImageNet weights (--pretrained PATH)")
    info = common.setup_distributed(args.device)
    try:
        common.seed_everything(args.seed)
        frames, cache = common.cache_split_images(frames, args.image_size, args.out, "boneage")
        for split, frame in frames.items():
            if frame.empty:
                raise common.InputError(f"{common.split_path(args.out, 'boneage', split)}: no readable "
                                        "images left; check the image files, then rerun 01/02")
        datasets = {split: common.CachedImageDataset(cache, frame["image_path"],
                                                     target=frame["boneage"].to_numpy(np.float32),
                                                     male=frame["male"].to_numpy(np.int64))
                    for split, frame in frames.items()}

        # The head starts at the training mean, so the first epochs learn the hand, not the offset.
        train_mean = float(frames["train"]["boneage"].mean())
        model = common.build_boneage_model(args.arch, pretrained=args.pretrained, init_months=train_mean,
                                           image_size=args.image_size)
        if args.init_from:
            common.load_init_weights(model, args.init_from)
        settings = common.TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                        patience=args.patience, workers=args.workers,
                                        compile=args.compile, monitor="mae", mode="min", seed=args.seed,
                                        force=args.force)
        # Everything 07_predict needs to rebuild the model, and everything that must match for
        # last.pt to be resumed (a changed split must not continue the old weights).
        meta = {"kind": "boneage", "arch": args.arch, "max_months": common.BONEAGE_MAX_MONTHS,
                "image_size": args.image_size, "init_months": train_mean, "pretrained": args.pretrained,
                "init_from": args.init_from, "settings": settings.identity(), "splits": common.split_fingerprint(frames, "id")}

        def forward(model, images, batch):
            return model(images, batch["male"].to(info.device))

        def evaluate(trained):
            from sklearn.metrics import mean_absolute_error
            predicted = predict_months(trained, datasets["val"], forward, args, info)
            return {"mae": mean_absolute_error(frames["val"]["boneage"], predicted)}

        common.log(f"bone age {args.arch} at {args.image_size} px: {len(frames['train'])} train / "
                   f"{len(frames['val'])} val / {len(frames['test'])} test images, training mean "
                   f"{train_mean:.1f} months, device {info.device}, {info.world_size} process(es)")
        result = common.fit(model, datasets["train"], np.zeros(len(frames["train"]), dtype=np.int64),
                            forward=forward, loss_fn=l1_loss, evaluate=evaluate, settings=settings,
                            info=info, run_dir=out_dir, checkpoint_meta=meta, balanced=False)

        # fit() returns with the best weights loaded; every rank predicts its share.
        predicted = {split: predict_months(model, datasets[split], forward, args, info)
                     for split in ("val", "test")}
        if info.is_main:
            metrics = write_outputs(out_dir, frames, predicted, train_mean, args, result)
            test = metrics["test"]
            common.log(f"bone age test: MAE {test['mae']:.2f} months (95% CI {test['mae_ci'][0]:.2f}-"
                       f"{test['mae_ci'][1]:.2f}, n={test['n']}) vs {test['baseline_mae']:.2f} for "
                       f"predicting the training mean; best epoch {result['best']['epoch']} -> {out_dir}")
            common.log_mlflow_run(mlflow, history_csv=out_dir / "history.csv", metrics={
                f"test_{k}": v for k, v in test.items()}, files=[out_dir / n for n in (
                    "metrics.json", "scatter.png", "bland_altman.png", "curves.png", "best.pt")])
    finally:
        if mlflow:
            mlflow.end_run()
        common.cleanup_distributed()


def read_boneage_split(out: Path, split: str) -> pd.DataFrame:
    """One split CSV with the columns this stage needs; `male` as 0/1 whatever pandas parsed."""
    path = common.split_path(out, "boneage", split)
    frame = common.read_split(out, "boneage", split)
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise common.InputError(f"{path}: missing column(s) {', '.join(missing)}; it needs "
                                f"{', '.join(REQUIRED_COLUMNS)}: rerun 01_split_test.py and 02_split_trainval.py")
    if frame.empty:
        raise common.InputError(f"{path}: no rows; rerun 01/02 on a bone-age CSV with images")
    frame["boneage"] = pd.to_numeric(frame["boneage"], errors="coerce")
    frame["male"] = frame["male"].astype(str).str.strip().str.lower().map(
        {"true": 1, "false": 0, "1": 1, "0": 0, "1.0": 1, "0.0": 0})
    bad = frame["boneage"].isna() | frame["male"].isna()
    if bad.any():
        raise common.InputError(f"{path}: {int(bad.sum())} row(s) without a numeric boneage or a "
                                f"True/False male (e.g. id {frame.loc[bad, 'id'].iloc[0]}); rerun 01/02")
    frame["image_path"] = frame["image_path"].astype(str)
    frame["sex"] = np.where(frame["male"] == 1, "M", "F")
    return frame


def l1_loss(predicted_months, batch):
    import torch.nn.functional as F
    # L1 rather than MSE: it is the reported metric, and a few mislabelled hands (bone age is read
    # by eye, +-1 year between readers) pull on it linearly instead of quadratically.
    return F.l1_loss(predicted_months, batch["target"].float())


def predict_months(model, dataset, forward, args, info) -> np.ndarray:
    return common.predict(model, dataset, forward, batch_size=args.batch_size, info=info)


def write_outputs(out_dir: Path, frames: dict, predicted: dict, train_mean: float, args,
                  result: dict) -> dict:
    """predictions.csv (no identifying data beyond the dataset id), metrics.json, the figures."""
    from sklearn.metrics import mean_absolute_error
    test = frames["test"]
    true_months = test["boneage"].to_numpy(dtype=float)
    table = pd.DataFrame({"id": test["id"].astype(str), "sex": test["sex"],
                          "true_months": true_months, "predicted_months": predicted["test"].round(2)})
    common.write_csv(table, out_dir / "predictions.csv")
    # RSNA has one image per child, so resampling images is resampling patients.
    scores = common.regression_metrics_with_ci(true_months, predicted["test"], test["id"].to_numpy(),
                                               args.bootstrap, args.seed)
    bands = common.age_group_names(DEFAULT_AGE_EDGES)
    band = common.age_group_of(true_months / 12.0, DEFAULT_AGE_EDGES)
    by = {"by_sex": {sex: test["sex"].to_numpy() == sex for sex in ("F", "M")},
          "by_age_band": {bands[g]: band == g for g in range(len(bands))}}
    metrics = {
        "val": {"mae": mean_absolute_error(frames["val"]["boneage"], predicted["val"]),
                "n": int(len(frames["val"]))},
        "test": {**scores, "mae_ci": [scores["mae_lo"], scores["mae_hi"]],
                 "baseline_mae": mean_absolute_error(true_months, np.full(len(test), train_mean)),
                 **{name: {value: common.regression_metrics_with_ci(
                     true_months[mask], predicted["test"][mask], test["id"].to_numpy()[mask],
                     args.bootstrap, args.seed) for value, mask in masks.items() if mask.any()}
                    for name, masks in by.items()}},
    }
    common.write_json(metrics, out_dir / "metrics.json")
    common.plot_training_curves(out_dir / "history.csv", out_dir / "curves.png", "bone age", "mae")
    title = f"bone age, test ({args.arch})"
    plot_scatter(true_months, predicted["test"], out_dir / "scatter.png", title)
    plot_bland_altman(true_months, predicted["test"], out_dir / "bland_altman.png", title)
    common.write_run_config(out_dir, args, init_months=train_mean, best=result["best"])
    return metrics


# ------------------------------------------------------------------------------------------------
# Figures: predicted against true bone age
# ------------------------------------------------------------------------------------------------

def plot_scatter(true, predicted, path: Path, title: str, unit: str = "months") -> Path:
    from sklearn.metrics import mean_absolute_error
    plt = common._figure()
    fig, ax = plt.subplots(figsize=(4.4, 4.4))
    ax.scatter(true, predicted, s=8, alpha=0.6)
    low, high = float(np.min(true)), float(np.max(true))
    ax.plot([low, high], [low, high], "--", color="grey", lw=1)
    ax.set(xlabel=f"true ({unit})", ylabel=f"predicted ({unit})",
           title=f"{title}\nMAE {mean_absolute_error(true, predicted):.1f} {unit}")
    return common.save_figure(fig, path)


def plot_bland_altman(true, predicted, path: Path, title: str, unit: str = "months") -> Path:
    plt = common._figure()
    true, predicted = np.asarray(true, dtype=float), np.asarray(predicted, dtype=float)
    mean, diff = (true + predicted) / 2, predicted - true
    bias, spread = diff.mean(), 1.96 * diff.std(ddof=1) if len(diff) > 1 else 0.0
    fig, ax = plt.subplots(figsize=(5, 3.8))
    ax.scatter(mean, diff, s=8, alpha=0.6)
    for value, style in ((bias, "-"), (bias + spread, "--"), (bias - spread, "--")):
        ax.axhline(value, color="grey", ls=style, lw=1)
    ax.set(xlabel=f"mean of true and predicted ({unit})", ylabel=f"predicted - true ({unit})",
           title=f"{title}\nbias {bias:+.1f}, limits of agreement +-{spread:.1f} {unit}")
    return common.save_figure(fig, path)


if __name__ == "__main__":
    main()
