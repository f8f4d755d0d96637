"""Stage 04: one fracture classifier per (projection x age group), all in ONE torchrun launch.

Each model (AP and Lat x 4 age groups = 8 by default) is trained in turn by every rank together:
the DDP-aware balanced sampler gives each rank a disjoint share of the same epoch, validation and
test predictions are gathered from all ranks and scored once, and rank 0 alone writes files.

Reads   OUT/splits/wrist_{train,val,test}.csv, age_groups.json (01/02);
        OUT/age/predictions.csv (03) with --route pred and for the predicted-group cascade
Writes  OUT/fracture/{AP,Lat}/group{g}/  best.pt (with the val-chosen threshold), last.pt
        (resumable), history.csv, metrics.json, roc.png, confusion.png, sample_audit.json
        OUT/fracture/summary.csv          one row per model (or its skip reason) + cascade rows
        OUT/fracture/test_predictions.csv every test image's fracture probability
        OUT/fracture/config.json

Imbalance is corrected once, never twice: by default the sampler draws balanced batches and the
focal loss uses alpha = 0.5 (focusing only). With --sampler none, focal alpha is the negative-class
fraction of the training set. (The original code stacked a balanced sampler on a weighted loss and
some models collapsed to all-negative.)

Decision threshold: Youden's J (sensitivity + specificity - 1) maximised on validation, stored in
best.pt and applied unchanged to test.

Run:
  python 04_train_fracture_ddp.py                                    # demo, 1 process
  python -m torch.distributed.run --nproc-per-node 2 04_train_fracture_ddp.py   # 2 CPU ranks (gloo)
  python -m torch.distributed.run --nproc-per-node 8 04_train_fracture_ddp.py --data DATA \\
      --preset full --pretrained convnextv2_large.safetensors --compile    # 8 GPUs (NCCL)
  python 04_train_fracture_ddp.py --epochs 1 --device cpu            # CPU smoke test
"""
from __future__ import annotations

import numpy as np
import pandas as pd

import common

PRESETS = {
    # timm's test_resnet (0.4 M parameters) learns the demo's cortical breaks at 64 px within a
    # CPU budget (measured: val AUC 0.93 on the largest group in 10 epochs); ConvNeXt from scratch
    # does not (PERFORMANCE.md). The full preset is the original ConvNeXtV2-L at 384 px.
    "demo": {"arch": "test_resnet", "epochs": 10, "batch_size": 32, "lr": 3e-3, "patience": 4},
    "full": {"arch": "convnextv2_large.fcmae_ft_in22k_in1k_384", "epochs": 30, "batch_size": 32,
             "lr": 5e-5, "patience": 6},
}


def parse_args(argv=None):
    parser = common.add_training_args(common.make_parser(__doc__))
    parser.add_argument("--route", choices=["true", "pred"], default="true",
                        help="group images by their true age group or by 03's prediction (default: true)")
    parser.add_argument("--loss", choices=["focal", "bce"], default="focal",
                        help="focal (gamma 2, per-class alpha) or plain BCE (default: focal)")
    parser.add_argument("--sampler", choices=["balanced", "none"], default="balanced",
                        help="balanced: half the draws from each class (default); none: plain shuffle")
    parser.add_argument("--gamma", type=float, default=2.0, help="focal loss gamma (default: 2)")
    # The youngest age group has a few dozen training images: one batch per epoch would mean a
    # dozen optimizer steps in all. Cycling it (with fresh augmentation) gives it enough steps.
    parser.add_argument("--min-epoch-samples", type=int, default=512,
                        help="draws per epoch at least, cycling small groups (default: 512; 0 = "
                             "exactly one pass over the training set)")
    parser.add_argument("--projections", default="AP,Lat", help="which projections (default: AP,Lat)")
    parser.add_argument("--groups", help="comma-separated age groups to train (default: all)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for CIs")
    parser.add_argument("--mlflow", action="store_true", help="log to MLflow (if installed)")
    args = common.resolve_common_args(parser.parse_args(argv))
    common.apply_training_preset(args, PRESETS, common.IMAGE_SIZE[args.preset])
    args.projections = [p.strip() for p in args.projections.split(",")]
    unknown = [p for p in args.projections if p not in common.PROJECTIONS]
    if unknown:
        parser.error(f"--projections: unknown {unknown}; use AP and/or Lat")
    return args


def main(argv=None):
    args = parse_args(argv)
    out_dir = common.ensure_writable_dir(args.out / "fracture")
    edges = common.read_age_edges(args.out)
    frames = _read_routed_splits(args)
    common.assert_no_patient_leak(frames)
    common.check_training_args(args)
    mlflow = _start_mlflow(args) if args.mlflow else None
    groups = [int(g) for g in args.groups.split(",")] if args.groups else list(range(len(edges) + 1))
    info = common.setup_distributed(args.device)
    try:
        frames, cache = common.cache_split_images(frames, args.image_size, args.out, "wrist")
        rows, test_probs = [], {}
        for projection in args.projections:
            for group in groups:
                result = _train_one_model(projection, group, frames, cache, args, edges, info, out_dir)
                rows.append(result["row"])
                if "test_probs" in result:
                    test_probs[(projection, group)] = result["test_probs"]
                if mlflow and info.is_main:
                    _log_mlflow(mlflow, result["row"], out_dir / projection / f"group{group}")
        if info.is_main:
            _write_summary(out_dir, frames["test"], test_probs, rows, args)
            common.write_run_config(out_dir, args)
    finally:
        if mlflow and info.is_main:
            mlflow.end_run()
        common.cleanup_distributed()


def _read_routed_splits(args) -> dict[str, pd.DataFrame]:
    """The splits with a `route_group` column: the true age group, or 03's predicted one."""
    frames = {split: common.read_split(args.out, "wrist", split) for split in ("train", "val", "test")}
    predictions_path = args.out / "age" / "predictions.csv"
    predicted = None
    if predictions_path.is_file():
        predicted = pd.read_csv(predictions_path, dtype={"filestem": str}).set_index("filestem")["age_group_pred"]
    elif args.route == "pred":
        raise common.InputError(f"{predictions_path}: not found; --route pred needs the age router: "
                                "run 03_train_age.py with the same --out first")
    for split, frame in frames.items():
        frame["age_group_pred"] = frame["filestem"].map(predicted) if predicted is not None else np.nan
        if args.route == "pred":
            missing = frame["age_group_pred"].isna().sum()
            if missing:
                raise common.InputError(f"{predictions_path}: no prediction for {missing} {split} images; "
                                        "rerun 03_train_age.py after 01/02")
        frame["route_group"] = frame["age_group_pred" if args.route == "pred" else "age_group"]
    return frames


def _train_one_model(projection, group, frames, cache, args, edges, info, out_dir) -> dict:
    """Train, threshold on val, evaluate on test; or return the reason this model is skipped."""
    run_dir = out_dir / projection / f"group{group}"
    name = f"{projection} group {group} {common.age_group_names(edges)[group]}"
    parts = {split: frame[(frame["projection_name"] == projection) & (frame["route_group"] == group)]
             .reset_index(drop=True) for split, frame in frames.items()}
    row = {"kind": "model", "projection": projection, "age_group": group,
           **{f"n_{split}": len(part) for split, part in parts.items()},
           **{f"pos_{split}": int(part["label"].sum()) for split, part in parts.items()}}
    reason = _skip_reason(parts)
    if reason:
        common.log(f"skip {name}: {reason}")
        return {"row": {**row, "status": "skipped", "reason": reason}}
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    datasets = {split: common.CachedImageDataset(cache, part["image_path"],
                                                 target=part["label"].to_numpy(np.float32))
                for split, part in parts.items()}
    common.seed_everything(args.seed)
    model = common.create_model(args.arch, num_classes=1, pretrained=args.pretrained,
                                image_size=args.image_size)
    if args.init_from:
        common.load_init_weights(model, args.init_from)
    prevalence = float(parts["train"]["label"].mean())
    alpha = 0.5 if args.sampler == "balanced" else 1.0 - prevalence
    settings = common.TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                    patience=args.patience, workers=args.workers,
                                    compile=args.compile, monitor="auc", seed=args.seed,
                                    min_epoch_samples=args.min_epoch_samples)
    meta = {"kind": "classifier", "task": "fracture", "arch": args.arch, "num_classes": 1,
            "image_size": args.image_size, "projection": projection, "age_group": group,
            "age_edges": list(edges), "route": args.route, "loss": args.loss,
            "sampler": args.sampler, "focal_alpha": alpha, "focal_gamma": args.gamma,
            "pretrained": args.pretrained, "init_from": args.init_from, "settings": settings.identity(),
            "splits": common.split_fingerprint(parts, "filestem")}

    def loss_fn(logits, batch):
        if args.loss == "focal":
            return common.binary_focal_loss(logits, batch["target"], alpha=alpha, gamma=args.gamma)
        import torch.nn.functional as F
        return F.binary_cross_entropy_with_logits(logits, batch["target"].float())

    def evaluate(trained):
        probs = _predict_probs(trained, datasets["val"], args, info)
        return {"auc": common.binary_metrics(parts["val"]["label"], probs, 0.5)["auc"]}

    common.log(f"--- {name}: {row['n_train']} train ({prevalence:.0%} fracture), {row['n_val']} val, "
               f"{row['n_test']} test; loss {args.loss} alpha {alpha:.2f}, sampler {args.sampler}")
    fitted = common.fit(model, datasets["train"], parts["train"]["label"].to_numpy(), forward=_forward,
                        loss_fn=loss_fn, evaluate=evaluate, settings=settings, info=info,
                        run_dir=run_dir, checkpoint_meta=meta, balanced=args.sampler == "balanced")
    val_probs = _predict_probs(model, datasets["val"], args, info)
    # Every test image of this projection, so the cascades can route any image to this model.
    projection_test = frames["test"][frames["test"]["projection_name"] == projection].reset_index(drop=True)
    test_set = common.CachedImageDataset(cache, projection_test["image_path"],
                                         target=projection_test["label"].to_numpy(np.float32))
    all_test_probs = _predict_probs(model, test_set, args, info)
    own = (projection_test["route_group"] == group).to_numpy()
    metrics = {}
    if info.is_main:
        metrics = _evaluate_and_save(run_dir, name, parts, val_probs, all_test_probs[own], args)
    return {"row": {**row, "status": "trained", "reason": "", "best_epoch": fitted["best"]["epoch"],
                    **{f"test_{k}": v for k, v in metrics.items()}},
            "test_probs": pd.Series(all_test_probs, index=projection_test["filestem"])}


def _skip_reason(parts: dict[str, pd.DataFrame]) -> str:
    for split in ("train", "val"):
        counts = parts[split]["label"].value_counts()
        if len(parts[split]) == 0:
            return f"no {split} images"
        if len(counts) < 2:
            only = "fracture" if counts.index[0] == 1 else "no-fracture"
            return f"{split} has only {only} images ({len(parts[split])})"
    return ""


def _forward(model, images, batch):
    return model(images).squeeze(1)


def _predict_probs(model, dataset, args, info) -> np.ndarray:
    logits = common.predict(model, dataset, _forward, batch_size=args.batch_size, info=info)
    return 1.0 / (1.0 + np.exp(-logits))


def _evaluate_and_save(run_dir, name, parts, val_probs, test_probs, args) -> dict:
    """Choose the threshold on val, score test with it, write metrics, plots and the final best.pt."""
    threshold = common.youden_threshold(parts["val"]["label"], val_probs)
    val = common.binary_metrics(parts["val"]["label"], val_probs, threshold)
    test = common.binary_metrics(parts["test"]["label"], test_probs, threshold)
    _, test["auc_ci"] = common.auc_with_ci(parts["test"]["label"], test_probs,
                                           parts["test"]["patient_id"], args.bootstrap, args.seed)
    common.write_json({"model": name, "val": val, "test": test}, run_dir / "metrics.json")
    checkpoint = common.load_checkpoint(run_dir / "best.pt")
    checkpoint.update(threshold=threshold, val_metrics=_flat(val), test_metrics=_flat(test))
    common.save_checkpoint(checkpoint, run_dir / "best.pt")
    if test["n"]:
        common.plot_roc(parts["test"]["label"], test_probs, run_dir / "roc.png",
                        f"{name}, test", threshold=threshold)
        common.plot_confusion(test["confusion"], ["no fracture", "fracture"], run_dir / "confusion.png",
                              f"{name}, test at {threshold:.2f}")
    common.log(f"{name}: test AUC {test['auc']:.3f} [{test['auc_ci'][0]:.3f}, {test['auc_ci'][1]:.3f}] "
               f"sens {test['sensitivity']:.2f} spec {test['specificity']:.2f} at {threshold:.2f} "
               f"(n={test['n']})")
    return {"auc": test["auc"], "auc_ci_low": test["auc_ci"][0], "auc_ci_high": test["auc_ci"][1],
            "sensitivity": test["sensitivity"], "specificity": test["specificity"],
            "threshold": threshold}


def _flat(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def _write_summary(out_dir, test, test_probs, rows, args) -> None:
    """Per-model rows, the true- and predicted-group cascades, and a study-level row."""
    table = test[["filestem", "patient_id", "study_number", "projection_name", "age", "age_group",
                  "age_group_pred", "label"]].copy()
    for route, column in (("true", "age_group"), ("pred", "age_group_pred")):
        table[f"prob_route_{route}"] = [
            test_probs[(p, int(g))].get(f, np.nan) if (p, g) in test_probs else np.nan
            for f, p, g in zip(table["filestem"], table["projection_name"],
                               table[column].fillna(-1).astype(int))]
    common.write_csv(table, out_dir / "test_predictions.csv")
    for route in ("true", "pred"):
        scored = table.dropna(subset=[f"prob_route_{route}"])
        if scored.empty:
            continue
        auc, ci = common.auc_with_ci(scored["label"], scored[f"prob_route_{route}"],
                                     scored["patient_id"], args.bootstrap, args.seed)
        rows.append({"kind": f"cascade_{route}_group", "status": "evaluated", "n_test": len(scored),
                     "pos_test": int(scored["label"].sum()), "test_auc": auc,
                     "test_auc_ci_low": ci[0], "test_auc_ci_high": ci[1],
                     "reason": f"{len(table) - len(scored)} test images had no model" if len(scored) < len(table) else ""})
    study_route = f"prob_route_{args.route}"
    studies = (table.dropna(subset=[study_route])
               .groupby(["patient_id", "study_number"], as_index=False)
               .agg(label=("label", "max"), prob=(study_route, "max")))
    if not studies.empty:
        # A study is positive if any image shows a fracture; its score is its most suspicious image.
        auc, ci = common.auc_with_ci(studies["label"], studies["prob"], studies["patient_id"],
                                     args.bootstrap, args.seed)
        rows.append({"kind": f"study_max_{args.route}_group", "status": "evaluated", "n_test": len(studies),
                     "pos_test": int(studies["label"].sum()), "test_auc": auc,
                     "test_auc_ci_low": ci[0], "test_auc_ci_high": ci[1], "reason": ""})
    summary = pd.DataFrame(rows)
    integer_columns = [c for c in summary if c == "age_group" or c.startswith(("n_", "pos_")) or c == "best_epoch"]
    summary[integer_columns] = summary[integer_columns].astype("Int64")  # not 1.0 beside cascade NaNs
    common.write_csv(summary, out_dir / "summary.csv")
    shown = summary[[c for c in ("kind", "projection", "age_group", "status", "n_test", "test_auc",
                                 "test_auc_ci_low", "test_auc_ci_high", "reason") if c in summary]]
    common.log("\n" + shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def _start_mlflow(args):
    try:
        import mlflow
    except ImportError:
        raise common.InputError("--mlflow: mlflow is not installed; `pip install mlflow` "
                                "(it is optional and not in requirements.txt)") from None
    import os
    if int(os.environ.get("RANK", "0")) == 0:
        mlflow.set_experiment("wrist-fracture")
        mlflow.start_run()
        mlflow.log_params({k: v for k, v in common.config_dict(args).items() if v is not None})
    return mlflow


def _log_mlflow(mlflow, row, run_dir) -> None:
    prefix = f"{row['projection']}_g{row['age_group']}"
    mlflow.log_metrics({f"{prefix}_{k}": float(v) for k, v in row.items()
                        if k.startswith("test_") and isinstance(v, (int, float)) and np.isfinite(v)})
    for name in ("metrics.json", "history.csv", "roc.png", "confusion.png"):
        if (run_dir / name).is_file():
            mlflow.log_artifact(str(run_dir / name), artifact_path=prefix)


if __name__ == "__main__":
    main()
