"""Stage 04: one fracture classifier per (projection x age group), all in ONE torchrun launch.

Each model (AP and Lat x 4 age groups = 8 by default) is trained in turn by every rank together:
the DDP-aware balanced sampler gives each rank a disjoint share of the same epoch, validation and
test predictions are gathered from all ranks and scored once, and rank 0 alone writes files.

Pooled start, per-group finish (--init pooled, default): per projection, a model trained on ALL
age groups first (evaluated like a group model), then each group model fine-tuned from it at
--finetune-lr for up to --finetune-epochs: the youngest groups' few dozen images are too few to
learn a thin cortical line from nothing. --init scratch | FILE (e.g. an earlier pooled/best.pt).
Age-conditioned (--conditioned, default on): per projection one more model of all ages that takes
the age as an input, as 05 takes sex (common.build_side_input_model), trained and scored on the
true age; where no age is known (cascade_pred, 07 without an age) it gets the router's expected
age, the sum over groups of 03's probability x the group's mean training age (in its best.pt).
Each group then deploys what wins on its own validation images: the pooled model, the conditioned
one, its own model, or the mean of the pooled and own models' probabilities (a group with < 5
validation images of a class, or whose own model was skipped: the pooled model, else the
conditioned one). --ablation also trains the other arm into OUT/fracture/ablation/<arm>/:
ablation.csv compares every arm (pooled, conditioned, scratch, from_pooled, mean, deployed) on the
same test images.

Reads   OUT/splits/wrist_{train,val,test}.csv, age_groups.json (01/02);
        OUT/age/predictions.csv (03) with --route pred and for the predicted-group cascade
Writes  OUT/fracture/{AP,Lat}/group{g}/  best.pt (val-chosen thresholds and calibration map),
        last.pt (resumable), history.csv, metrics.json, roc.png, pr.png, curves.png, confusion.png
        OUT/fracture/{AP,Lat}/pooled/    the same for the all-ages model (with --init pooled)
        OUT/fracture/{AP,Lat}/conditioned/  the same for the age-conditioned model
        OUT/fracture/{AP,Lat}/group{g}/deployed.json  what 06 and 07 deploy for the group, chosen
                                          on its validation images: the pooled or conditioned
                                          model, its own model or the mean of pooled and own;
                                          model files, threshold, map
        OUT/fracture/summary.csv          one row per model (or its skip reason) + cascade rows
        OUT/fracture/operating_points.csv each model, cascade_true/pred and study_pred at the rules
                                          youden, sens90, sens95, with 95% CIs; test_studies.csv
        OUT/fracture/calibration.json, reliability.png, subgroups.csv (cascade_pred)
        OUT/fracture/calibration_choice.json  the map the cascade deploys (none, one cascade map, or
                                          per model), chosen by out-of-fold ECE on validation
        OUT/fracture/ablation.csv         arm x scope (each group, the cascade): n, AUC, 95% CI
        OUT/fracture/ablation_predictions.csv  each arm's probability for every test image
        OUT/fracture/test_predictions.csv every test image's raw and calibrated probability
        OUT/fracture/config.json
main() tells the training story; the choices made on validation (deployed arm, thresholds,
calibration) and the test evaluation (summary, operating points, studies, calibration, subgroups,
ablation) follow it, each under its own heading.

Imbalance is corrected once, never twice: by default the sampler draws balanced batches and the
focal loss uses alpha = 0.5 (focusing only). With --sampler none, focal alpha is the negative-class
fraction of the training set. (The original code stacked a balanced sampler on a weighted loss and
some models collapsed to all-negative.)

Decision threshold: Youden's J (sensitivity + specificity - 1) maximised on validation, stored in
best.pt and applied unchanged to test; so are the sens90/sens95 thresholds and a Platt calibration
map (fit_calibration) that changes the reported probability, never the decision. A group
with < 5 validation fractures or normals takes the pooled model's threshold and map (summary.csv:
threshold_source, calibration_source). Then the cascade's calibration is chosen on validation:
these per-model maps, one map fitted on the cascade's validation probabilities, or none, whichever
has the lowest ECE at the source prevalence out of fold (patient-grouped cross-validation). A
model calling every validation image one class, or with test sensitivity/specificity at 1/0, is
flagged (summary.csv: warning).

Run:
  python 04_train_fracture_ddp.py                                    # demo, 1 process
  python -m torch.distributed.run --nproc-per-node 2 04_train_fracture_ddp.py   # 2 CPU ranks (gloo)
  python -m torch.distributed.run --nproc-per-node 8 04_train_fracture_ddp.py --data DATA \\
      --preset full --pretrained convnextv2_large.safetensors --compile    # 8 GPUs (NCCL)
  python 04_train_fracture_ddp.py --epochs 1 --device cpu            # CPU smoke test
  python 04_train_fracture_ddp.py --ablation                          # + groups from scratch
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

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
    parser.add_argument("--conditioned", action=argparse.BooleanOptionalAction, default=True,
                        help="also train one age-conditioned model per projection (the age as an input), a "
                             "candidate each group may deploy (default: on; --no-conditioned skips it)")
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
        rows, arm_probs, expected_age_probs, validated, shared_models = [], {}, {}, {}, {}
        for projection in args.projections:
            pooled = None
            if args.init == "pooled" or args.ablation:
                pooled = _train_one_model(projection, None, frames, cache, args, edges, info,
                                          out_dir / projection / "pooled")
                rows.append(pooled["row"])
                if "test_probs" in pooled:
                    shared_models[(projection, "pooled")] = pooled
                common.barrier()  # rank 0 has written pooled/best.pt; every rank starts from it next
            if args.conditioned:
                conditioned = _train_one_model(projection, None, frames, cache, args, edges, info,
                                               out_dir / projection / "conditioned", conditioned=True)
                rows.append(conditioned["row"])
                if "test_probs" in conditioned:
                    shared_models[(projection, "conditioned")] = conditioned
            for arm, arm_dir in _arms(args, out_dir):
                init = _init_file(arm, args, pooled, out_dir / projection / "pooled" / "best.pt")
                for group in groups:
                    result = _train_one_model(projection, group, frames, cache, args, edges, info,
                                              arm_dir / projection / f"group{group}", init, pooled)
                    if "test_probs" in result:
                        arm_probs.setdefault(arm, {})[(projection, group)] = result["test_probs"]
                        for name in ("pooled", "conditioned"):  # scored on the same images as the group
                            shared = shared_models.get((projection, name))
                            if shared:
                                arm_probs.setdefault(name, {})[(projection, group)] = shared["test_probs"]
                                if "expected_age_test_probs" in shared:
                                    expected_age_probs.setdefault(name, {})[(projection, group)] = \
                                        shared["expected_age_test_probs"]
                    if arm_dir != out_dir:
                        continue  # an ablation arm: reported in ablation.csv only
                    rows.append(result["row"])
                    validated[(projection, group)] = {**result, "arm": arm}  # trained or skipped
                    if mlflow and info.is_main:
                        _log_mlflow(mlflow, result["row"], out_dir / projection / f"group{group}")
        if info.is_main:
            deployments = choose_deployments(out_dir, frames, validated, shared_models, rows, arm_probs,
                                             expected_age_probs)
            calibration = choose_calibration(frames, deployments, rows)
            for (projection, group), deployment in deployments.items():
                (out_dir / projection / f"group{group}").mkdir(parents=True, exist_ok=True)  # a skipped one's too
                common.write_json({k: v for k, v in deployment.items() if not k.endswith("_probs")},
                                  out_dir / projection / f"group{group}" / "deployed.json")
            write_fracture_summary(out_dir, frames, deployments, rows, args, calibration)
            if len(arm_probs) > 1:
                write_ablation(out_dir, frames["test"], arm_probs, args, expected_age_probs)
            common.write_run_config(out_dir, args)
            if mlflow:
                common.log_mlflow_run(mlflow, files=[out_dir / name for name in FRACTURE_EVALUATION_FILES])
    finally:
        if mlflow and info.is_main:
            mlflow.end_run()
        common.cleanup_distributed()


def _read_routed_splits(args) -> dict[str, pd.DataFrame]:
    """The splits with a `route_group` column (the true age group, or 03's predicted one) and, with
    03's predictions, `expected_age`: the router's expected age, what the age-conditioned model is
    given when the age is unknown (its probability of each group x the group's mean training age)."""
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
    expected = np.nan
    if predicted is not None:
        probs = routed.set_index("filestem").filter(regex=r"^prob_group\d+$")
        expected = pd.Series(probs.to_numpy(float) @ group_mean_ages(frames["train"], probs.shape[1]),
                             index=probs.index)
    for split, frame in frames.items():
        frame["age_group_pred"] = frame["filestem"].map(predicted) if predicted is not None else np.nan
        frame["expected_age"] = frame["filestem"].map(expected) if predicted is not None else np.nan
        if args.route == "pred":
            missing = frame["age_group_pred"].isna().sum()
            if missing:
                raise common.InputError(f"{predictions_path}: no prediction for {missing} {split} images; "
                                        "rerun 03_train_age.py after 01/02")
        frame["route_group"] = frame["age_group_pred" if args.route == "pred" else "age_group"]
    return frames


def group_mean_ages(train: pd.DataFrame, n_groups: int) -> list[float]:
    """Each age group's mean training age in years (stored in the conditioned model's checkpoint,
    where 07 reads it); a group with no training image takes its neighbours' (interpolated)."""
    means = train.groupby("age_group")["age"].mean().reindex(range(n_groups))
    return [float(v) for v in means.interpolate(limit_direction="both")]


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


def _train_one_model(projection, group, frames, cache, args, edges, info, run_dir, init=None, pooled=None,
                     conditioned=False) -> dict:
    """Train, threshold on val, evaluate on test; or return the reason this model is skipped.

    group None = a model of every age group of the projection: the pooled one, or with
    `conditioned` the one that takes the age as an input (the true age in training and scoring;
    for the predicted-group cascade also the router's expected age: `expected_age_*_probs`).
    `init`: a (checkpoint path, label) to start from (fine-tuning at --finetune-lr), or None.
    """
    is_pooled = group is None
    kind = "conditioned" if conditioned else "pooled" if is_pooled else "model"
    name = (f"{projection} {'age-conditioned' if conditioned else 'pooled'} (all ages)" if is_pooled
            else f"{projection} group {group} {common.age_group_names(edges)[group]}")
    parts = {split: frame[(frame["projection_name"] == projection) & (is_pooled | (frame["route_group"] == group))]
             .reset_index(drop=True) for split, frame in frames.items()}
    row = {"kind": kind, "projection": projection, "age_group": group,
           "init": "scratch" if init is None else init[1],
           **{f"n_{split}": len(part) for split, part in parts.items()},
           **{f"pos_{split}": int(part["label"].sum()) for split, part in parts.items()}}
    reason = _skip_reason(parts)
    if reason:
        common.log(f"skip {name}: {reason}")
        return {"row": {**row, "status": "skipped", "reason": reason}}
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    age = {"age": "age"} if conditioned else {}  # the dataset column _forward feeds the model
    datasets = {split: _dataset(cache, part, age) for split, part in parts.items()}
    common.seed_everything(args.seed)
    if conditioned:
        model = common.build_side_input_model(args.arch, "age", pretrained=args.pretrained,
                                              image_size=args.image_size)
    else:
        model = common.create_model(args.arch, num_classes=1, pretrained=args.pretrained,
                                    image_size=args.image_size)
    start = "scratch"
    if init is not None:
        common.load_init_weights(model, init[0])
        # The starting weights' hash, not the path: a retrained pooled model must not resume here.
        start = f"{init[1]}:{weights_fingerprint(model.state_dict())}"
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
    if conditioned:  # 07 rebuilds it from side_input and gives unknown ages as the router's expectation
        meta.update(side_input="age", group_mean_age=group_mean_ages(frames["train"], len(edges) + 1))

    def loss_fn(logits, batch):
        if args.loss == "focal":
            return common.binary_focal_loss(logits, batch["target"], alpha=alpha, gamma=args.gamma)
        import torch.nn.functional as F
        return F.binary_cross_entropy_with_logits(logits, batch["target"].float())

    def evaluate(trained):
        probs = _predict_probs(trained, datasets["val"], args, info)
        return {"auc": binary_metrics(parts["val"]["label"], probs, 0.5)["auc"]}

    common.log(f"--- {name}: {row['n_train']} train ({prevalence:.0%} fracture), {row['n_val']} val, "
               f"{row['n_test']} test; loss {args.loss} alpha {alpha:.2f}, sampler {args.sampler}, "
               f"start {row['init']}, lr {settings.lr:g}")
    fitted = common.fit(model, datasets["train"], parts["train"]["label"].to_numpy(), forward=_forward,
                        loss_fn=loss_fn, evaluate=evaluate, settings=settings, info=info,
                        run_dir=run_dir, checkpoint_meta=meta, balanced=args.sampler == "balanced")
    val_probs = _predict_probs(model, datasets["val"], args, info)
    # Every test image of this projection, so the cascades can route any image to this model.
    projection_test = frames["test"][frames["test"]["projection_name"] == projection].reset_index(drop=True)
    all_test_probs = _predict_probs(model, _dataset(cache, projection_test, age), args, info)
    expected_age = {}
    if conditioned and frames["test"]["expected_age"].notna().any():  # 03 ran: as cascade_pred routes
        expected_age = {f"expected_age_{split}_probs": pd.Series(
            _predict_probs(model, _dataset(cache, part, {"age": "expected_age"}), args, info), index=part["filestem"])
            for split, part in (("val", parts["val"]), ("test", projection_test))}
        # An image 03 could not read has no expected age: choosing on validation, its true age stands in.
        expected_age["expected_age_val_probs"] = expected_age["expected_age_val_probs"].fillna(
            pd.Series(val_probs, index=parts["val"]["filestem"]))
    own = (is_pooled | (projection_test["route_group"] == group)).to_numpy()
    threshold, threshold_source = small_group_threshold(
        parts["val"]["label"], (pooled or {}).get("row", {}).get("test_threshold"), "pooled model's")
    calibration, calibration_source = small_group_calibration(parts["val"]["label"], (pooled or {}).get("calibration"))
    metrics, warning = {}, ""
    if info.is_main:
        metrics = _evaluate_and_save(run_dir, name, parts, val_probs, all_test_probs[own], args,
                                     threshold=threshold, calibration=calibration)
        calibration = metrics.pop("calibration")
        warning = degenerate_warning(val_probs, metrics)
        if warning:
            common.log(f"WARNING {name}: {warning}")
        if threshold_source != "val Youden":
            common.log(f"{name}: threshold {metrics['threshold']:.3f} = {threshold_source}")
    return {"row": {**row, "status": "trained", "reason": "", "best_epoch": fitted["best"]["epoch"],
                    "threshold_source": threshold_source, "calibration_source": calibration_source,
                    "warning": warning, **{f"test_{k}": v for k, v in metrics.items()}},
            "test_probs": pd.Series(all_test_probs, index=projection_test["filestem"]),
            "val_probs": pd.Series(val_probs, index=parts["val"]["filestem"]), "calibration": calibration,
            **expected_age}


def _skip_reason(parts: dict[str, pd.DataFrame]) -> str:
    for split in ("train", "val"):
        counts = parts[split]["label"].value_counts()
        if len(parts[split]) == 0:
            return f"no {split} images"
        if len(counts) < 2:
            only = "fracture" if counts.index[0] == 1 else "no-fracture"
            return f"{split} has only {only} images ({len(parts[split])})"
    return ""


def _dataset(cache, part: pd.DataFrame, age: dict) -> common.CachedImageDataset:
    """The images of `part` with their labels and, for the conditioned model, {"age": column}'s ages."""
    return common.CachedImageDataset(cache, part["image_path"], target=part["label"].to_numpy(np.float32),
                                     **{key: part[column].to_numpy(np.float32) for key, column in age.items()})


def _forward(model, images, batch):
    if "age" in batch:  # the age-conditioned model: one logit per image already
        return model(images, batch["age"].to(images.device))
    return model(images).squeeze(1)


def _predict_probs(model, dataset, args, info) -> np.ndarray:
    from scipy.special import expit
    return expit(common.predict(model, dataset, _forward, batch_size=args.batch_size, info=info))


def _evaluate_and_save(run_dir, name, parts, val_probs, test_probs, args, threshold=None, calibration=None) -> dict:
    """Choose thresholds and the calibration map on val, score test, write metrics, plots, best.pt.

    The youden threshold is the model's decision (07 applies it); sens90/sens95 are the other
    operating points reported. The calibration map (Platt, fitted on val only) changes the
    probability 07 reports, never the decision: thresholds stay on the raw scale. A given
    `threshold` or `calibration` (a small group borrowing the pooled model's) replaces its own.
    Returns the test metrics of summary.csv and, under "calibration", the map it stored.
    """
    thresholds = operating_thresholds(parts["val"]["label"], val_probs)
    if threshold is not None:
        thresholds["youden"] = threshold
    threshold = thresholds["youden"]
    calibration = calibration or fit_calibration(parts["val"]["label"], val_probs)
    val = binary_metrics(parts["val"]["label"], val_probs, threshold)
    test = binary_metrics(parts["test"]["label"], test_probs, threshold)
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
            "threshold": threshold, "calibration": calibration}


def _flat(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def _log_mlflow(mlflow, row, run_dir) -> None:
    prefix = f"{row['projection']}_g{row['age_group']}_"
    common.log_mlflow_run(mlflow, history_csv=run_dir / "history.csv", prefix=prefix, artifact_path=prefix.rstrip("_"),
                          metrics={k: v for k, v in row.items() if k.startswith("test_")},
                          files=[run_dir / n for n in ("metrics.json", "history.csv", "roc.png", "pr.png",
                                                       "confusion.png", "curves.png", "best.pt")])


# ------------------------------------------------------------------------------------------------
# Choices made on validation: thresholds, calibration, the deployed arm, starting weights
# ------------------------------------------------------------------------------------------------

def weights_fingerprint(state_dict: dict) -> str:
    """A short hash of a state_dict's tensors (names, shapes, values): recorded in a fine-tuned
    model's checkpoint so that it resumes only from the same starting weights."""
    import hashlib

    import torch
    digest = hashlib.sha1()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# Fewer validation positives (or negatives) than this and a model's own threshold is noise: the
# Youden optimum on 3 fractures jumps with every image.
MIN_THRESHOLD_CLASS = 5


def small_group_threshold(val_labels, fallback: float | None, fallback_name: str) -> tuple[float | None, str]:
    """(threshold, where it comes from): None = choose on this model's own validation set; a
    validation set with < MIN_THRESHOLD_CLASS of a class borrows `fallback` (e.g. the pooled
    model's threshold) and says so; without a fallback its own threshold is marked UNRELIABLE."""
    counts = _too_few(val_labels)
    if not counts:
        return None, "val Youden"
    if fallback is None or not np.isfinite(fallback):
        return None, f"val Youden, UNRELIABLE: {counts} and no model to borrow a threshold from"
    return float(fallback), f"{fallback_name} ({counts})"


def small_group_calibration(val_labels, fallback: dict | None) -> tuple[dict | None, str]:
    """(map, source), as thresholds are chosen: None = fit on this model's own validation set
    ('own'); a validation set with < MIN_THRESHOLD_CLASS of a class takes `fallback`, the pooled
    model's map ('pooled'): a Platt fit on 2 normals is noise (one group's ECE went 0.12 -> 0.50)."""
    if _too_few(val_labels) and fallback is not None:
        return fallback, "pooled"
    return None, "own"


def _too_few(val_labels) -> str:
    """'' when validation has enough of both classes to choose on, else the counts, for the log."""
    positives = int(np.sum(val_labels))
    negatives = len(val_labels) - positives
    if min(positives, negatives) >= MIN_THRESHOLD_CLASS:
        return ""
    return f"val has {positives} positive / {negatives} negative images, < {MIN_THRESHOLD_CLASS} of one class"


def degenerate_warning(val_probs, metrics: dict) -> str:
    """Say out loud when a binary model answers one class for everything (every validation image
    on one side of its threshold, or test sensitivity and specificity at opposite extremes)."""
    problems = []
    called = np.asarray(val_probs) >= metrics["threshold"]
    if called.all() or not called.any():
        problems.append(f"calls every validation image {'positive' if called.all() else 'negative'}")
    sensitivity, specificity = metrics.get("sensitivity"), metrics.get("specificity")
    if {sensitivity, specificity} == {0.0, 1.0}:
        problems.append(f"test sensitivity {sensitivity:.2f} with specificity {specificity:.2f}")
    return "degenerate model: " + "; ".join(problems) if problems else ""


def youden_threshold(labels: Sequence[int], probs: Sequence[float]) -> float:
    """The threshold maximising sensitivity + specificity - 1 on the given (validation) set.

    Chosen on validation and applied unchanged to test, so the test figures stay honest.
    """
    from sklearn.metrics import roc_curve
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=float)
    if len(np.unique(labels)) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(labels, probs)
    best = int(np.argmax(tpr - fpr))
    return float(min(max(thresholds[best], 0.0), 1.0))


def binary_metrics(labels: Sequence[int], probs: Sequence[float], threshold: float) -> dict:
    """ROC AUC, PR AUC, accuracy, F1, sensitivity, specificity and the confusion matrix at a threshold."""
    from sklearn.metrics import (accuracy_score, average_precision_score, confusion_matrix,
                                 f1_score, roc_auc_score)
    labels = np.asarray(labels).astype(int)
    probs = np.asarray(probs, dtype=float)
    predicted = (probs >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    both = len(np.unique(labels)) == 2
    return {
        "auc": float(roc_auc_score(labels, probs)) if both else float("nan"),
        "pr_auc": float(average_precision_score(labels, probs)) if both else float("nan"),
        "accuracy": float(accuracy_score(labels, predicted)),
        "f1": float(f1_score(labels, predicted, zero_division=0)),
        "sensitivity": float(tp / (tp + fn)) if tp + fn else float("nan"),
        "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
        "threshold": float(threshold),
        "n": int(len(labels)), "n_positive": int(labels.sum()),
        "confusion": [[int(tn), int(fp)], [int(fn), int(tp)]],
    }


def sensitivity_threshold(labels, probs, target: float) -> float:
    """The HIGHEST threshold whose sensitivity on these (validation) labels reaches `target`:
    the most specific operating point that still misses at most 1 - target of the fractures."""
    from sklearn.metrics import roc_curve
    labels, probs = np.asarray(labels), np.asarray(probs, dtype=float)
    if len(np.unique(labels)) < 2:
        return float("nan")
    _, tpr, thresholds = roc_curve(labels, probs, drop_intermediate=False)
    reached = int(np.flatnonzero(tpr >= target - 1e-12)[0])
    return float(min(thresholds[reached], 1.0))


def operating_thresholds(labels, probs) -> dict[str, float]:
    """The three rules 04 stores and evaluates, all chosen on validation."""
    return {"youden": youden_threshold(labels, probs),
            "sens90": sensitivity_threshold(labels, probs, 0.90),
            "sens95": sensitivity_threshold(labels, probs, 0.95)}


def fit_calibration(labels, probs) -> dict:
    """Platt scaling (logistic regression on the logit) fitted on VALIDATION predictions.

    Why Platt and not temperature: the balanced sampler shifts the model's prior to 50%, an
    intercept that a temperature (one slope) cannot remove. The map is increasing, so it keeps the
    ranking (AUC) and, with the threshold kept on the raw scale, every decision. A model that ranks
    validation backwards (slope <= 0) gets the identity map, said in `method`, instead of a map
    that would reverse its probabilities.
    """
    from sklearn.linear_model import LogisticRegression
    labels = np.asarray(labels).astype(int)
    logits = common.clipped_logit(probs).reshape(-1, 1)
    if len(np.unique(labels)) < 2:
        return {"method": "identity", "slope": 1.0, "intercept": 0.0, "n": int(len(labels)),
                "reason": "validation has one class"}
    fitted = LogisticRegression(penalty=None, solver="lbfgs", max_iter=1000).fit(logits, labels)
    slope, intercept = float(fitted.coef_[0, 0]), float(fitted.intercept_[0])
    if not slope > 0:
        return {"method": "identity", "slope": 1.0, "intercept": 0.0, "n": int(len(labels)),
                "reason": f"Platt slope {slope:.3g} <= 0 on validation"}
    return {"method": "platt", "slope": slope, "intercept": intercept, "n": int(len(labels)), "reason": ""}


# The arms a group may deploy, simplest first: on a tie of validation AUC the earlier one wins
# (a shared model over a group's own, one model over two).
DEPLOY_ORDER = ("pooled", "conditioned", "from_pooled", "scratch", "from_file", "mean")
SHARED_ARMS = ("pooled", "conditioned")  # the models of all ages; a small group deploys the first there is


def choose_deployments(out_dir: Path, frames: dict[str, pd.DataFrame], validated: dict, shared_models: dict,
                       rows: list[dict], arm_probs: dict, expected_age_probs: dict) -> dict:
    """Per (projection, age group), what 06 and 07 deploy, chosen on the group's validation images:
    the pooled model, the age-conditioned model, the group's own model (fine-tuned from the pooled
    one, or --init's), or the mean of the pooled and own models' probabilities, whichever has the
    highest validation AUC. A group with fewer than MIN_THRESHOLD_CLASS validation images of a
    class deploys a shared model (the pooled one, else the conditioned one): its AUC on a few
    images cannot tell the arms apart (the youngest groups deployed models at chance). A group
    whose own model was skipped (e.g. no validation fracture) chooses among the shared models.

    The conditioned model is judged, as it is deployed, on the router's expected age where 03 ran
    (07's input for an image without an age, and cascade_pred's), else on the true age.

    Returns {key: record}: the arm, its model files (relative to OUT/fracture), threshold(s) and
    calibration map chosen on validation, the candidates' validation AUCs, and (for 04 itself) the
    arm's validation and test probabilities. The group's summary row gets `deployed`."""
    deployments = {}
    val = frames["val"]
    for (projection, group), own in validated.items():
        members = val[(val["projection_name"] == projection) & (val["route_group"] == group)]
        index, labels = members["filestem"], members["label"].to_numpy()
        own_path = f"{projection}/group{group}/best.pt"
        trained = "test_probs" in own
        candidates = {own["arm"]: {"val": own["val_probs"], "test": own["test_probs"], "models": [own_path]}} \
            if trained else {}
        for arm in SHARED_ARMS:
            shared = shared_models.get((projection, arm))
            if shared is not None:
                candidates[arm] = {"val": shared.get("expected_age_val_probs", shared["val_probs"]).loc[index],
                                   "test": shared["test_probs"], "models": [f"{projection}/{arm}/best.pt"],
                                   "expected_age_test": shared.get("expected_age_test_probs")}
        if not candidates:
            continue  # the group's model skipped and no shared model: 07 skips its images, saying why
        if trained and "pooled" in candidates:
            pooled = candidates["pooled"]
            candidates["mean"] = {"val": (pooled["val"] + own["val_probs"]) / 2, "models": pooled["models"] + [own_path],
                                  "test": (pooled["test"] + own["test_probs"]) / 2}
            arm_probs.setdefault("mean", {})[(projection, group)] = candidates["mean"]["test"]
        arm, aucs, reason = choose_arm(labels, {name: c["val"] for name, c in candidates.items()})
        if not trained:
            reason = f"own model skipped ({own['row']['reason']}); {reason}"
        chosen, small = candidates[arm], bool(_too_few(labels))
        if arm == own["arm"] or small:  # the group's own model, or a shared one for a small group: its own choices
            checkpoint = common.load_checkpoint(out_dir / chosen["models"][0])
            thresholds, calibration = checkpoint["thresholds"], checkpoint["calibration"]
            threshold_source, calibration_source = ((own["row"]["threshold_source"], own["row"]["calibration_source"])
                                                    if arm == own["arm"] else (f"{arm} model's ({reason})", arm))
        else:
            thresholds = operating_thresholds(labels, chosen["val"])
            calibration = fit_calibration(labels, chosen["val"])
            threshold_source, calibration_source = "val Youden", "own"
        deployments[(projection, group)] = {
            "arm": arm, "models": chosen["models"], "threshold": thresholds["youden"], "thresholds": thresholds,
            "threshold_source": threshold_source, "calibration": calibration, "calibration_source": calibration_source,
            "val_auc": aucs, "reason": reason, "val_probs": chosen["val"], "test_probs": chosen["test"]}
        if chosen.get("expected_age_test") is not None:  # what cascade_pred scores, as 07 without an age
            deployments[(projection, group)]["expected_age_test_probs"] = chosen["expected_age_test"]
        if trained:  # the ablation compares arms on the images every arm scores
            arm_probs.setdefault("deployed", {})[(projection, group)] = chosen["test"]
            if chosen.get("expected_age_test") is not None:
                expected_age_probs.setdefault("deployed", {})[(projection, group)] = chosen["expected_age_test"]
        own["row"].update(deployed=arm, deployed_reason=reason, threshold_source=threshold_source,
                          calibration_source=calibration_source, **{f"val_auc_{a}": v for a, v in aucs.items()})
        common.log(f"{projection} group {group} deploys {arm} ({reason}; validation AUC "
                   + ", ".join(f"{a} {v:.3f}" for a, v in aucs.items()) + ")")
    return deployments


def choose_arm(labels, candidates: dict[str, pd.Series]) -> tuple[str, dict[str, float], str]:
    """(arm, each candidate's validation AUC, why): the highest AUC, or a shared model (the pooled
    one first) when validation has too few images of a class to rank the candidates."""
    from sklearn.metrics import roc_auc_score
    aucs = {arm: float(roc_auc_score(labels, probs)) if len(set(labels)) == 2 else float("nan")
            for arm, probs in candidates.items()}
    counts = _too_few(labels)
    shared = [arm for arm in SHARED_ARMS if arm in candidates]
    if counts and shared:
        return shared[0], aucs, counts
    ranked = [arm for arm in DEPLOY_ORDER if arm in candidates and np.isfinite(aucs[arm])]
    if not ranked:
        return next(iter(candidates)), aucs, "no validation AUC: the group's own model"
    return max(ranked, key=lambda arm: aucs[arm]), aucs, "highest validation AUC"


CALIBRATION_CHOICES = ("none", "cascade", "per model")  # on a tie, the simpler one


def choose_calibration(frames: dict[str, pd.DataFrame], deployments: dict, rows: list[dict]) -> dict:
    """The calibration of the deployed cascade, chosen on validation: each group's map (a small
    group borrowing the pooled model's), one Platt map fitted on the cascade's validation
    probabilities, or none. The deployments and their summary rows get the chosen map.

    Per-group maps can leave the cascade worse calibrated than no map at all; one cascade map has
    2 parameters instead of 2 per group. Each option is scored out of fold (patient-grouped
    cross-validation on validation, ECE at the training + validation prevalence 07 meets), so
    the option with more parameters does not win by fitting the images it is scored on."""
    prevalence = float(pd.concat([frames["train"]["label"], frames["val"]["label"]]).mean())
    parts = [frames["val"].set_index("filestem").loc[deployment["val_probs"].index, ["label", "patient_id"]]
             .assign(model=f"{key[0]}/group{key[1]}", raw=deployment["val_probs"].to_numpy(float))
             for key, deployment in deployments.items()]
    val = pd.concat(parts).reset_index(drop=True) if parts else pd.DataFrame()
    if val.empty or val["patient_id"].nunique() < 2 or val["label"].nunique() < 2:
        return {}  # nothing to cross-validate on: the per-group maps stay
    borrowed = {f"{key[0]}/group{key[1]}": deployment["calibration"] for key, deployment in deployments.items()
                if deployment["calibration_source"] in SHARED_ARMS}
    ece = {name: common.calibration_metrics(val["label"], probs, prevalence=prevalence)["ece"]
           for name, probs in _out_of_fold(val, borrowed).items()}
    chosen = min(CALIBRATION_CHOICES, key=lambda name: ece[name] if np.isfinite(ece[name]) else np.inf)
    if chosen != "per model":
        single = fit_calibration(val["label"], val["raw"]) if chosen == "cascade" else {
            "method": "identity", "slope": 1.0, "intercept": 0.0, "n": len(val),
            "reason": "no map beat the raw probabilities out of fold on validation"}
        for deployment in deployments.values():
            deployment.update(calibration=single, calibration_source=chosen)
        for row in rows:
            if row.get("kind") == "model" and (row["projection"], row["age_group"]) in deployments:
                row["calibration_source"] = chosen
    common.log("calibration chosen on validation: " + chosen + " (out-of-fold ECE at prevalence "
               + ", ".join(f"{name} {value:.3f}" for name, value in ece.items()) + ")")
    return {"deployed": chosen, "out_of_fold_ece_at_prevalence": ece, "prevalence": prevalence,
            "n_val": len(val)}


def _out_of_fold(val: pd.DataFrame, borrowed: dict, folds: int = 5) -> dict[str, np.ndarray]:
    """Each calibration option's probability for every validation image, fitted without the
    image's patient: the raw one, one cascade map, each group's own map (or its borrowed one)."""
    from sklearn.model_selection import GroupKFold
    raw, labels, models = val["raw"].to_numpy(float), val["label"].to_numpy(int), val["model"].to_numpy()
    probs = {"none": raw, "cascade": np.full(len(val), np.nan), "per model": np.full(len(val), np.nan)}
    patients = val["patient_id"].astype(str).to_numpy()
    splitter = GroupKFold(n_splits=min(folds, len(set(patients))))
    for fitting, held in splitter.split(raw, groups=patients):
        cascade = fit_calibration(labels[fitting], raw[fitting])
        probs["cascade"][held] = common.apply_calibration(raw[held], cascade)
        for model in set(models[held]):
            mine, own = held[models[held] == model], fitting[models[fitting] == model]
            group_map = borrowed.get(model) or fit_calibration(labels[own], raw[own])
            probs["per model"][mine] = common.apply_calibration(raw[mine], group_map)
    return probs


# ------------------------------------------------------------------------------------------------
# Test evaluation: the decision 07 deploys (stored thresholds, study rule), calibration, subgroups, ablation
# ------------------------------------------------------------------------------------------------

FRACTURE_EVALUATION_FILES = ("summary.csv", "operating_points.csv", "calibration.json", "calibration_choice.json",
                             "subgroups.csv", "reliability.png", "test_predictions.csv", "test_studies.csv")


OPERATING_RULES = ("youden", "sens90", "sens95")


FRACTURE_SUBGROUPS = {"projection": "projection_name", "age_group": "age_group", "sex": "gender", "cast": "cast",
             "initial_exam": "initial_exam", "laterality": "laterality"}


def write_fracture_summary(out_dir, frames, deployments, rows, args, calibration_choice: dict | None = None) -> None:
    """Per-model rows, the true- and predicted-group cascades of the deployed arms and the study row
    (summary.csv); operating points, calibration and subgroups of the decision 07 deploys."""
    test = frames["test"].assign(study_id=frames["test"].get("study_id", frames["test"]["study_number"]))
    table = test[["filestem", "patient_id", "study_id", "laterality", "projection_name", "age",
                  "age_group", "age_group_pred", "label", *FRACTURE_SUBGROUPS.values()]].copy()
    table = table.loc[:, ~table.columns.duplicated()]
    models = deployments  # each key's threshold(s) and calibration map, as 07 reads them
    for route, column in (("true", "age_group"), ("pred", "age_group_pred")):
        # cascade_pred knows no age: a deployed conditioned model gets the router's expected age
        test_probs = {key: deployment.get("expected_age_test_probs" if route == "pred" else "test_probs",
                                          deployment["test_probs"]) for key, deployment in deployments.items()}
        keys = list(zip(table["projection_name"], table[column].fillna(-1).astype(int)))
        raw = np.array([test_probs[k].get(f, np.nan) if k in test_probs else np.nan
                        for f, k in zip(table["filestem"], keys)], dtype=float)
        table[f"prob_route_{route}"] = raw
        table[f"calibrated_prob_route_{route}"] = [
            common.apply_calibration([p], models[k].get("calibration"))[0] if k in models else np.nan
            for p, k in zip(raw, keys)]
        for rule in OPERATING_RULES:  # each image is decided at its own model's threshold, as 07 does
            table[f"threshold_{rule}_route_{route}"] = [
                models[k].get("thresholds", {}).get(rule, np.nan) if k in models else np.nan for k in keys]
    common.write_csv(table, out_dir / "test_predictions.csv")
    prevalence = float(pd.concat([frames["train"]["label"], frames["val"]["label"]]).mean())
    points = []
    for row in rows:
        if row.get("kind") == "model" and row.get("status") == "trained":  # not the pooled model
            key = (row["projection"], int(row["age_group"]))
            own = table[(table["projection_name"] == key[0])
                        & (table["age_group" if args.route == "true" else "age_group_pred"] == key[1])]
            points += _operating_points(f"{key[0]}_group{key[1]}", own, args.route, f"prob_route_{args.route}",
                                        prevalence, args)
    for route in ("true", "pred"):
        scored = table.dropna(subset=[f"prob_route_{route}"])
        if scored.empty:
            common.log(f"no cascade_{route}: no test image has a {route}-group model (03 not run?)")
            continue
        missing = f"{len(table) - len(scored)} test images had no model" if len(scored) < len(table) else ""
        rows.append(_summary_row(f"cascade_{route}_group", scored, f"calibrated_prob_route_{route}", args, missing))
        points += _operating_points(f"cascade_{route}", scored, route, f"calibrated_prob_route_{route}",
                                    prevalence, args)
    studies, note = _complete_studies(table, args, args.route)
    if not studies.empty:
        rows.append(_summary_row(f"study_max_{args.route}_group", studies, "prob", args, note))
    if "calibrated_prob_route_pred" in table and table["prob_route_pred"].notna().any():
        points += _study_points(table, prevalence, args)
        _calibration_and_subgroups(out_dir, table, rows, models, prevalence, args, calibration_choice or {})
    summary = pd.DataFrame(rows)
    integer_columns = [c for c in summary if c == "age_group" or c.startswith(("n_", "pos_")) or c == "best_epoch"]
    summary[integer_columns] = summary[integer_columns].astype("Int64")  # not 1.0 beside cascade NaNs
    common.write_csv(summary, out_dir / "summary.csv")
    common.write_csv(pd.DataFrame(points), out_dir / "operating_points.csv")
    shown = summary[[c for c in ("kind", "projection", "age_group", "status", "n_test", "test_auc",
                                 "test_auc_ci_low", "test_auc_ci_high", "reason") if c in summary]]
    common.log("\n" + shown.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def _summary_row(kind, scored, prob_column, args, reason="") -> dict:
    auc, ci = common.auc_with_ci(scored["label"], scored[prob_column], scored["patient_id"], args.bootstrap, args.seed)
    return {"kind": kind, "status": "evaluated", "n_test": len(scored), "pos_test": int(scored["label"].sum()),
            "test_auc": auc, "test_auc_ci_low": ci[0], "test_auc_ci_high": ci[1], "reason": reason}


def _operating_points(scope, scored, route, prob_column, prevalence, args) -> list[dict]:
    """One row per rule; each image is decided at its own model's raw threshold, as 07 does."""
    points = []
    for rule in OPERATING_RULES:
        thresholds = scored[f"threshold_{rule}_route_{route}"].to_numpy(float)
        single = thresholds[0] if len(set(thresholds)) == 1 else float("nan")  # a cascade has several
        points.append({"scope": scope, "rule": rule, **common.binary_metrics_with_ci(
            scored["label"], scored[prob_column], scored["patient_id"], single, args.bootstrap, args.seed,
            prevalence, decisions=scored[f"prob_route_{route}"].to_numpy() >= thresholds)})
    return points


def _complete_studies(table, args, route, rule="youden") -> tuple[pd.DataFrame, str]:
    """Studies (07's rule) whose images are all in the test set and all scored; the note counts the rest."""
    raw = table[f"prob_route_{route}"]
    images = table.assign(decision=(raw >= table[f"threshold_{rule}_route_{route}"]).astype(int),
                          scored=raw.notna().astype(int), prob=table[f"calibrated_prob_route_{route}"].fillna(-1.0))
    studies = common.study_table(images, "prob", "decision", all_scored=("scored", "min"))
    path = common.split_path(args.out, "wrist", "quarantine")  # the test patients' other images
    quarantine = common.read_split(args.out, "wrist", "quarantine") if path.is_file() else table.iloc[:0]
    quarantine = quarantine.assign(study_id=quarantine.get("study_id", quarantine.get("study_number")), p=0)
    keys = ["patient_id", "study_id", "laterality"]
    outside = studies[keys].merge(common.study_table(quarantine, "p", "p")[keys], how="left",
                                  indicator=True)["_merge"].eq("both").to_numpy()
    unscored = studies["all_scored"].eq(0).to_numpy()
    note = (f"{outside.sum()} partial studies (images outside the test set) and "
            f"{(unscored & ~outside).sum()} with unscored images left out")
    return studies[~outside & ~unscored].drop(columns="all_scored").reset_index(drop=True), note


def _study_points(table, prevalence, args) -> list[dict]:
    """study_pred: 07's decision (any image positive at its model's threshold, routed by 03)."""
    points = []
    for rule in OPERATING_RULES:
        studies, note = _complete_studies(table, args, "pred", rule)
        if rule == "youden":
            common.write_csv(studies, args.out / "fracture" / "test_studies.csv")
            common.log(f"study_pred: {len(studies)} complete studies; {note}")
        points.append({"scope": "study_pred", "rule": rule, **common.binary_metrics_with_ci(
            studies["label"], studies["prob"], studies["patient_id"], float("nan"), args.bootstrap,
            args.seed, prevalence, decisions=studies["decision"]), "note": note})
    return points


def _calibration_and_subgroups(out_dir, table, rows, models, prevalence, args, choice: dict) -> None:
    """calibration.json + reliability.png (raw vs calibrated on test), subgroups.csv of cascade_pred.

    Brier/ECE are given on the test set as it is (balanced by design) and reweighted to the
    training + validation prevalence (`*_at_prevalence`), the population the map was fitted for.
    """
    scored, route = table.dropna(subset=["prob_route_pred"]), args.route

    def scores(frame, raw, calibrated, method):
        return {"raw": common.calibration_metrics(frame["label"], frame[raw]),
                "calibrated": common.calibration_metrics(frame["label"], frame[calibrated]),
                "raw_at_prevalence": common.calibration_metrics(frame["label"], frame[raw], prevalence=prevalence),
                "calibrated_at_prevalence": common.calibration_metrics(frame["label"], frame[calibrated],
                                                                       prevalence=prevalence),
                "method": method, "prevalence": prevalence}

    report = {"cascade_pred": scores(scored, "prob_route_pred", "calibrated_prob_route_pred",
                                     choice.get("deployed", "per model"))}
    for row in rows:
        if row.get("kind") == "model" and row.get("status") == "trained":
            own = table[(table["projection_name"] == row["projection"])
                        & (table["age_group" if route == "true" else "age_group_pred"] == row["age_group"])]
            method = models[(row["projection"], int(row["age_group"]))]["calibration"]["method"]
            report[f"{row['projection']}_group{int(row['age_group'])}"] = scores(
                own, f"prob_route_{route}", f"calibrated_prob_route_{route}", method)
    common.write_json(report, out_dir / "calibration.json")
    common.write_json(choice, out_dir / "calibration_choice.json")
    common.plot_reliability({"raw": (scored["label"], scored["prob_route_pred"]),
                             "calibrated": (scored["label"], scored["calibrated_prob_route_pred"])},
                            out_dir / "reliability.png", "cascade_pred, test")
    decisions = scored["prob_route_pred"] >= scored["threshold_youden_route_pred"]
    subgroups = []
    for name, column in FRACTURE_SUBGROUPS.items():
        for value, members in scored.groupby(column):
            metrics = common.binary_metrics_with_ci(
                members["label"], members["calibrated_prob_route_pred"], members["patient_id"], float("nan"),
                args.bootstrap, args.seed, decisions=decisions[members.index])
            metrics.pop("threshold")
            subgroups.append({"subgroup": name, "value": value, **metrics})
    common.write_csv(pd.DataFrame(subgroups), out_dir / "subgroups.csv")


ABLATION_ARMS = ("pooled", "conditioned", "scratch", "from_pooled", "from_file", "mean", "deployed")


def write_ablation(out_dir, test, arm_probs, args, expected_age_probs: dict | None = None) -> None:
    """Each arm's test AUC (patient-bootstrap 95% CI) on the same images: per group, then cascaded.

    Group scope: the test images routed to that group (--route). cascade_true: every image goes to
    its true age group's model; cascade_pred (with 03's predictions): to its predicted group's. The
    pooled and conditioned arms score every image with their projection's one model. The
    conditioned model is given the true age, except in cascade_pred, which knows no age: there it
    gets the router's expected age (`expected_age_probs`, also where a group deploys it), as 07
    does for an image without an age. Images some arm has no model for are left out of all.
    """
    table = test[["filestem", "patient_id", "projection_name", "route_group", "age_group", "age_group_pred", "label"]]
    table = table.loc[:, ~table.columns.duplicated()].copy()
    routes = {"group": "route_group", "cascade_true": "age_group"}
    if test["age_group_pred"].notna().any():
        routes["cascade_pred"] = "age_group_pred"
    for arm, models in arm_probs.items():
        for column, route in routes.items():
            chosen = {**models, **(expected_age_probs or {}).get(arm, {})} if column == "cascade_pred" else models
            table[f"{arm}_{column}"] = [
                chosen[(p, int(g))].get(f, np.nan) if (p, g) in chosen else np.nan
                for f, p, g in zip(table["filestem"], table["projection_name"], table[route].fillna(-1).astype(int))]
    arms = [a for a in ABLATION_ARMS if a in arm_probs]
    scopes = [(f"{p}_group{g}", (table["projection_name"] == p) & (table["route_group"] == g), "group")
              for p, g in sorted({key for models in arm_probs.values() for key in models})]
    scopes += [(cascade, table["projection_name"].isin(args.projections), cascade) for cascade in routes
               if cascade != "group"]
    rows = []
    for scope, mask, column in scopes:
        scored = table[mask].dropna(subset=[f"{arm}_{column}" for arm in arms])
        for arm in arms:
            auc, (low, high) = common.auc_with_ci(scored["label"], scored[f"{arm}_{column}"],
                                                  scored["patient_id"], args.bootstrap, args.seed)
            rows.append({"arm": arm, "scope": scope, "n": len(scored), "auc": auc, "auc_lo": low, "auc_hi": high})
    ablation = pd.DataFrame(rows)
    common.write_csv(ablation, out_dir / "ablation.csv")
    common.write_csv(table, out_dir / "ablation_predictions.csv")  # each arm's probability per image
    aucs = ablation.pivot(index="scope", columns="arm", values="auc").reindex(columns=arms)
    common.log("ablation, test AUC (95% CIs in ablation.csv):\n" + aucs.to_string(float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
