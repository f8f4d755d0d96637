"""Stage 04: one fracture classifier per (projection x age group), all in ONE torchrun launch.

Each model (AP and Lat x 4 age groups = 8 by default) is trained in turn by every rank together:
the DDP-aware balanced sampler gives each rank a disjoint share of the same epoch, validation and
test predictions are gathered from all ranks and scored once, and rank 0 alone writes files.

Pooled start, per-group finish (--init pooled, default): per projection, a model trained on ALL
age groups first (evaluated like a group model), then each group model fine-tuned from it at
--finetune-lr for up to --finetune-epochs: the youngest groups' few dozen images are too few to
learn a thin cortical line from nothing. --init scratch | FILE (e.g. an earlier pooled/best.pt).
--ablation also trains the other arm into OUT/fracture/ablation/<arm>/: ablation.csv compares the
pooled model alone, groups from scratch and groups from pooled on the same test images.

Reads   OUT/splits/wrist_{train,val,test}.csv, age_groups.json (01/02);
        OUT/age/predictions.csv (03) with --route pred and for the predicted-group cascade
Writes  OUT/fracture/{AP,Lat}/group{g}/  best.pt (val-chosen thresholds and calibration map),
        last.pt (resumable), history.csv, metrics.json, roc.png, pr.png, curves.png, confusion.png
        OUT/fracture/{AP,Lat}/pooled/    the same for the all-ages model (with --init pooled)
        OUT/fracture/summary.csv          one row per model (or its skip reason) + cascade rows
        OUT/fracture/operating_points.csv each model, cascade_true/pred and study_pred at the rules
                                          youden, sens90, sens95, with 95% CIs; test_studies.csv
        OUT/fracture/calibration.json, reliability.png, subgroups.csv (cascade_pred)
        OUT/fracture/ablation.csv         arm x scope (each group, the cascade): n, AUC, 95% CI
        OUT/fracture/ablation_predictions.csv  each arm's probability for every test image
        OUT/fracture/test_predictions.csv every test image's raw and calibrated probability
        OUT/fracture/config.json
The test evaluation (summary, operating points, studies, calibration, subgroups, ablation) is
common.py's section 11, so this file reads as the training story.

Imbalance is corrected once, never twice: by default the sampler draws balanced batches and the
focal loss uses alpha = 0.5 (focusing only). With --sampler none, focal alpha is the negative-class
fraction of the training set. (The original code stacked a balanced sampler on a weighted loss and
some models collapsed to all-negative.)

Decision threshold: Youden's J (sensitivity + specificity - 1) maximised on validation, stored in
best.pt and applied unchanged to test; so are the sens90/sens95 thresholds and a Platt calibration
map (common.fit_calibration) that changes the reported probability, never the decision. A group
with < 5 validation fractures or normals takes the pooled model's threshold (summary.csv:
threshold_source). A model calling every validation image one class, or with test
sensitivity/specificity at 1/0, is flagged (summary.csv: warning).

Run:
  python 04_train_fracture_ddp.py                                    # demo, 1 process
  python -m torch.distributed.run --nproc-per-node 2 04_train_fracture_ddp.py   # 2 CPU ranks (gloo)
  python -m torch.distributed.run --nproc-per-node 8 04_train_fracture_ddp.py --data DATA \\
      --preset full --pretrained convnextv2_large.safetensors --compile    # 8 GPUs (NCCL)
  python 04_train_fracture_ddp.py --epochs 1 --device cpu            # CPU smoke test
  python 04_train_fracture_ddp.py --ablation                          # + groups from scratch
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

import common

PRESETS = {
    # timm's test_resnet (0.4 M parameters) learns the demo's cortical breaks at 64 px within a
    # CPU budget (measured: val AUC 0.93 on the largest group in 10 epochs); ConvNeXt from scratch
    # does not (PERFORMANCE.md). The full preset is the original ConvNeXtV2-L at 384 px.
    # The demo's size and fine-tuning epochs were chosen by measurement (2 idle cores, AP models
    # of the default demo: pooled + 4 groups, test AUC of the 26 subtle / 54 obvious fractures
    # against all 80 normals, fine-tuned arm): 64 px 0.79 / 0.88 in 121 s; 96 px 0.82 / 0.90 in
    # 209 s; 128 px 0.83 / 0.92 in 309 s (every CI overlaps, e.g. subtle [0.68, 0.89] at 64 px and
    # [0.69, 0.92] at 128 px); 64 px with 5 fine-tuning epochs instead of 10: 0.83 / 0.88 in 96 s.
    # A larger image would not fit the whole demo into 10 minutes; see README "Performance".
    "demo": {"arch": "test_resnet", "epochs": 10, "batch_size": 32, "lr": 3e-3, "patience": 4,
             "finetune_lr": 1e-3, "finetune_epochs": 5},
    "full": {"arch": "convnextv2_large.fcmae_ft_in22k_in1k_384", "epochs": 30, "batch_size": 32,
             "lr": 5e-5, "patience": 6, "finetune_lr": 2e-5, "finetune_epochs": 30},
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
    parser.add_argument("--init", default="pooled",
                        help="where each group model starts: pooled (fine-tuned from an all-ages model "
                             "trained first; default), scratch, or a checkpoint FILE (best.pt/last.pt)")
    parser.add_argument("--finetune-lr", type=float,
                        help="peak learning rate of a group model that starts from weights (default: per preset)")
    parser.add_argument("--finetune-epochs", type=int,
                        help="maximum epochs of a group model that starts from weights (default: per "
                             "preset, at most --epochs)")
    parser.add_argument("--ablation", action="store_true",
                        help="also train the other arm (scratch or from pooled) for ablation.csv")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for CIs")
    args = common.resolve_common_args(parser.parse_args(argv))
    finetune_epochs_given = args.finetune_epochs is not None
    common.apply_training_preset(args, PRESETS, common.IMAGE_SIZE[args.preset])
    if not finetune_epochs_given:  # the preset's, but never more than --epochs (--epochs 1: a smoke test)
        args.finetune_epochs = min(args.finetune_epochs, args.epochs)
    args.projections = [p.strip() for p in args.projections.split(",")]
    unknown = [p for p in args.projections if p not in common.PROJECTIONS]
    if unknown:
        parser.error(f"--projections: unknown {unknown}; use AP and/or Lat")
    if args.init_from:  # the flag 03 and 05 share: here the same as --init FILE
        args.init = args.init_from
    if args.init not in ("pooled", "scratch") and not Path(args.init).is_file():
        raise common.InputError(f"--init {args.init}: checkpoint not found; give pooled, scratch, or the "
                                "path of a best.pt/last.pt written by 04 (same --arch)")
    return args


def main(argv=None):
    args = parse_args(argv)
    common.import_torch()
    out_dir = common.ensure_writable_dir(args.out / "fracture")
    edges = common.read_age_edges(args.out)
    frames = _read_routed_splits(args)
    common.assert_no_patient_leak(frames)
    common.check_training_args(args)
    mlflow = common.start_mlflow(args, "wrist-fracture") if args.mlflow else None
    groups = [int(g) for g in args.groups.split(",")] if args.groups else list(range(len(edges) + 1))
    info = common.setup_distributed(args.device)
    try:
        frames, cache = common.cache_split_images(frames, args.image_size, args.out, "wrist")
        rows, test_probs, arm_probs = [], {}, {}
        for projection in args.projections:
            pooled = None
            if args.init == "pooled" or args.ablation:
                pooled = _train_one_model(projection, None, frames, cache, args, edges, info,
                                          out_dir / projection / "pooled")
                rows.append(pooled["row"])
                common.barrier()  # rank 0 has written pooled/best.pt; every rank starts from it next
            for arm, arm_dir in _arms(args, out_dir):
                init = _init_file(arm, args, pooled, out_dir / projection / "pooled" / "best.pt")
                for group in groups:
                    result = _train_one_model(projection, group, frames, cache, args, edges, info,
                                              arm_dir / projection / f"group{group}", init, pooled)
                    if "test_probs" in result:
                        arm_probs.setdefault(arm, {})[(projection, group)] = result["test_probs"]
                        if pooled and "test_probs" in pooled:
                            arm_probs.setdefault("pooled", {})[(projection, group)] = pooled["test_probs"]
                    if arm_dir != out_dir:
                        continue  # an ablation arm: reported in ablation.csv only
                    rows.append(result["row"])
                    if "test_probs" in result:
                        test_probs[(projection, group)] = result["test_probs"]
                    if mlflow and info.is_main:
                        _log_mlflow(mlflow, result["row"], out_dir / projection / f"group{group}")
        if info.is_main:
            common.write_fracture_summary(out_dir, frames, test_probs, rows, args)
            if len(arm_probs) > 1:
                common.write_ablation(out_dir, frames["test"], arm_probs, args)
            common.write_run_config(out_dir, args)
            if mlflow:
                common.log_mlflow_run(mlflow, files=[out_dir / name for name in common.FRACTURE_EVALUATION_FILES])
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
        routed = pd.read_csv(predictions_path, dtype={"filestem": str})
        _check_router_splits(routed, frames, predictions_path)
        predicted = routed.set_index("filestem")["age_group_pred"]
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


def _check_router_splits(routed: pd.DataFrame, frames: dict[str, pd.DataFrame], path) -> None:
    """Refuse router predictions made for other splits (01/02 rerun after 03): every predicted
    image must sit in the same split now. (An image 03 could not decode has no row, which is fine.)"""
    current = pd.concat([frame[["filestem"]].assign(split=split) for split, frame in frames.items()])
    now = routed["filestem"].map(current.set_index("filestem")["split"])
    moved = routed[now != routed["split"]]
    if len(moved):
        example = moved.iloc[0]
        where = now[moved.index[0]]
        raise common.InputError(f"{path}: made for other splits ({len(moved)} images moved, e.g. "
                                f"{example['filestem']} was {example['split']}, is now "
                                f"{where if isinstance(where, str) else 'in no split'}); rerun "
                                "03_train_age.py with the same --out")


def _arms(args, out_dir) -> list[tuple[str, Path]]:
    """(arm, folder) pairs: the arm --init asks for writes the usual folders; --ablation adds the
    other per-group arm under ablation/, so both are scored on the same test images."""
    main_arm = {"pooled": "from_pooled", "scratch": "scratch"}.get(args.init, "from_file")
    extra = [arm for arm in ("scratch", "from_pooled") if arm != main_arm] if args.ablation else []
    return [(main_arm, out_dir)] + [(arm, out_dir / "ablation" / arm) for arm in extra]


def _init_file(arm, args, pooled, pooled_path):
    """(checkpoint, label for summary.csv) the arm's group models start from, or None = scratch."""
    if arm == "from_pooled" and (pooled is None or pooled["row"]["status"] != "trained"):
        common.log("the pooled model was skipped: group models start from scratch")
    elif arm in ("from_pooled", "from_file"):
        return (pooled_path, "pooled") if arm == "from_pooled" else (Path(args.init), Path(args.init).name)
    return None


def _train_one_model(projection, group, frames, cache, args, edges, info, run_dir, init=None, pooled=None) -> dict:
    """Train, threshold on val, evaluate on test; or return the reason this model is skipped.

    group None = the pooled model, trained on every age group of the projection. `init`: a
    (checkpoint path, label) to start from (fine-tuning at --finetune-lr), or None = random init.
    """
    is_pooled = group is None
    name = f"{projection} {'pooled (all ages)' if is_pooled else f'group {group} {common.age_group_names(edges)[group]}'}"
    parts = {split: frame[(frame["projection_name"] == projection) & (is_pooled | (frame["route_group"] == group))]
             .reset_index(drop=True) for split, frame in frames.items()}
    row = {"kind": "pooled" if is_pooled else "model", "projection": projection, "age_group": group,
           "init": "scratch" if init is None else init[1],
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
    start = "scratch"
    if init is not None:
        common.load_init_weights(model, init[0])
        # The starting weights' hash, not the path: a retrained pooled model must not resume here.
        start = f"{init[1]}:{common.weights_fingerprint(model.state_dict())}"
    prevalence = float(parts["train"]["label"].mean())
    alpha = 0.5 if args.sampler == "balanced" else 1.0 - prevalence
    settings = common.TrainSettings(epochs=args.epochs if init is None else args.finetune_epochs,
                                    batch_size=args.batch_size, lr=args.lr if init is None else args.finetune_lr,
                                    patience=args.patience, workers=args.workers,
                                    compile=args.compile, monitor="auc", seed=args.seed,
                                    min_epoch_samples=args.min_epoch_samples, force=args.force)
    meta = {"kind": "classifier", "task": "fracture", "arch": args.arch, "num_classes": 1,
            "image_size": args.image_size, "projection": projection, "age_group": group,
            "age_edges": list(edges), "route": args.route, "loss": args.loss,
            "sampler": args.sampler, "focal_alpha": alpha, "focal_gamma": args.gamma,
            "pretrained": args.pretrained, "init": start, "settings": settings.identity(),
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
               f"{row['n_test']} test; loss {args.loss} alpha {alpha:.2f}, sampler {args.sampler}, "
               f"start {row['init']}, lr {settings.lr:g}")
    fitted = common.fit(model, datasets["train"], parts["train"]["label"].to_numpy(), forward=_forward,
                        loss_fn=loss_fn, evaluate=evaluate, settings=settings, info=info,
                        run_dir=run_dir, checkpoint_meta=meta, balanced=args.sampler == "balanced")
    val_probs = _predict_probs(model, datasets["val"], args, info)
    # Every test image of this projection, so the cascades can route any image to this model.
    projection_test = frames["test"][frames["test"]["projection_name"] == projection].reset_index(drop=True)
    test_set = common.CachedImageDataset(cache, projection_test["image_path"],
                                         target=projection_test["label"].to_numpy(np.float32))
    all_test_probs = _predict_probs(model, test_set, args, info)
    own = (is_pooled | (projection_test["route_group"] == group)).to_numpy()
    threshold, threshold_source = common.small_group_threshold(
        parts["val"]["label"], (pooled or {}).get("row", {}).get("test_threshold"), "pooled model's")
    metrics, warning = {}, ""
    if info.is_main:
        metrics = _evaluate_and_save(run_dir, name, parts, val_probs, all_test_probs[own], args,
                                     threshold=threshold)
        warning = common.degenerate_warning(val_probs, metrics)
        if warning:
            common.log(f"WARNING {name}: {warning}")
        if threshold_source != "val Youden":
            common.log(f"{name}: threshold {metrics['threshold']:.3f} = {threshold_source}")
    return {"row": {**row, "status": "trained", "reason": "", "best_epoch": fitted["best"]["epoch"],
                    "threshold_source": threshold_source, "warning": warning,
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


def _evaluate_and_save(run_dir, name, parts, val_probs, test_probs, args, threshold=None) -> dict:
    """Choose thresholds and the calibration map on val, score test, write metrics, plots, best.pt.

    The youden threshold is the model's decision (07 applies it); sens90/sens95 are the other
    operating points reported. The calibration map (Platt, fitted on val only) changes the
    probability 07 reports, never the decision: thresholds stay on the raw scale. A given
    `threshold` (a small group borrowing the pooled model's) replaces the youden one.
    """
    thresholds = common.operating_thresholds(parts["val"]["label"], val_probs)
    if threshold is not None:
        thresholds["youden"] = threshold
    threshold = thresholds["youden"]
    calibration = common.fit_calibration(parts["val"]["label"], val_probs)
    val = common.binary_metrics(parts["val"]["label"], val_probs, threshold)
    test = common.binary_metrics(parts["test"]["label"], test_probs, threshold)
    test_ci = common.binary_metrics_with_ci(parts["test"]["label"], test_probs, parts["test"]["patient_id"],
                                            threshold, args.bootstrap, args.seed)
    test["auc_ci"] = [test_ci["auc_lo"], test_ci["auc_hi"]]
    common.write_json({"model": name, "val": val, "test": test, "test_ci": test_ci,
                       "thresholds": thresholds, "calibration": calibration}, run_dir / "metrics.json")
    checkpoint = common.load_checkpoint(run_dir / "best.pt")
    checkpoint.update(threshold=threshold, thresholds=thresholds, calibration=calibration,
                      val_metrics=_flat(val), test_metrics=_flat(test))
    common.save_checkpoint(checkpoint, run_dir / "best.pt")
    if test["n"]:
        common.plot_roc(parts["test"]["label"], test_probs, run_dir / "roc.png",
                        f"{name}, test", threshold=threshold)
        common.plot_pr(parts["test"]["label"], test_probs, run_dir / "pr.png", f"{name}, test", threshold)
        common.plot_confusion(test["confusion"], ["no fracture", "fracture"], run_dir / "confusion.png",
                              f"{name}, test at {threshold:.2f}")
    common.plot_training_curves(run_dir / "history.csv", run_dir / "curves.png", name, "auc")
    common.log(f"{name}: test AUC {test['auc']:.3f} [{test['auc_ci'][0]:.3f}, {test['auc_ci'][1]:.3f}] "
               f"sens {test['sensitivity']:.2f} spec {test['specificity']:.2f} at {threshold:.2f} "
               f"(n={test['n']}); calibration {calibration['method']}")
    return {"auc": test["auc"], "auc_ci_low": test["auc_ci"][0], "auc_ci_high": test["auc_ci"][1],
            **{f"{k}{end}": test_ci[f"{k}{end}"] for k in ("sensitivity", "specificity") for end in ("", "_lo", "_hi")},
            "threshold": threshold}


def _flat(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def _log_mlflow(mlflow, row, run_dir) -> None:
    prefix = f"{row['projection']}_g{row['age_group']}_"
    common.log_mlflow_run(mlflow, history_csv=run_dir / "history.csv", prefix=prefix, artifact_path=prefix.rstrip("_"),
                          metrics={k: v for k, v in row.items() if k.startswith("test_")},
                          files=[run_dir / n for n in ("metrics.json", "history.csv", "roc.png", "pr.png",
                                                       "confusion.png", "curves.png", "best.pt")])


if __name__ == "__main__":
    main()
