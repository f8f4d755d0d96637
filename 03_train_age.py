"""Stage 03: train the age-group router and predict every wrist image's age group.

The fracture models are trained per age group (04). At inference the true age may be unknown,
so this classifier routes an image to its group's model; 04 (--route pred) and 07_predict use it.

Reads   OUT/splits/wrist_{train,val,test}.csv and OUT/splits/age_groups.json (from 01/02)
Writes  OUT/age/best.pt, last.pt, history.csv       the router (resumable)
        OUT/age/predictions.csv   filestem, split, projection_name, age, age_group,
                                  age_group_pred, prob_group0..K-1 for every train/val/test image
        OUT/age/metrics.json      {"val": {...}, "test": {"accuracy", "macro_f1", "n"}}, each
                                  with "<name>_lo"/"<name>_hi" (patient-bootstrap 95% interval)
        OUT/age/curves.png        training loss and validation accuracy per epoch
        OUT/age/confusion.png, OUT/age/config.json

Run:
  python 03_train_age.py                                   # demo data, demo preset
  python 03_train_age.py --data DATA --preset full         # Swin-L at 384 px on a GPU
  python -m torch.distributed.run --nproc-per-node 4 03_train_age.py --data DATA
  python 03_train_age.py --epochs 1 --device cpu           # CPU smoke test
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

import common

PRESETS = {
    # timm's test_resnet (0.4 M parameters) learns the demo's maturity cues at 64 px within a
    # CPU budget; ConvNeXt/Swin from scratch do not (PERFORMANCE.md). The full preset is the
    # original pipeline's Swin-L.
    "demo": {"arch": "test_resnet", "epochs": 8, "batch_size": 32, "lr": 3e-3, "patience": 4},
    "full": {"arch": "swin_large_patch4_window12_384", "epochs": 30, "batch_size": 32,
             "lr": 5e-5, "patience": 5},
}


def parse_args(argv=None):
    parser = common.add_training_args(common.make_parser(__doc__))
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for CIs (default: 1000)")
    args = common.resolve_common_args(parser.parse_args(argv))
    common.apply_training_preset(args, PRESETS, common.IMAGE_SIZE[args.preset])
    return args


def main(argv=None):
    args = parse_args(argv)
    common.import_torch()
    out_dir = common.ensure_writable_dir(args.out / "age")
    edges = common.read_age_edges(args.out)
    names = common.age_group_names(edges)
    frames = {split: common.read_split(args.out, "wrist", split) for split in ("train", "val", "test")}
    common.assert_no_patient_leak(frames)
    common.check_training_args(args)
    mlflow = common.start_mlflow(args, "wrist-age-router") if args.mlflow else None
    info = common.setup_distributed(args.device)
    try:
        common.seed_everything(args.seed)
        frames, cache = common.cache_split_images(frames, args.image_size, args.out, "wrist")
        datasets = {split: common.CachedImageDataset(cache, frame["image_path"],
                                                     target=frame["age_group"].to_numpy(np.int64))
                    for split, frame in frames.items()}
        model = common.create_model(args.arch, num_classes=len(names), pretrained=args.pretrained,
                                    image_size=args.image_size)
        if args.init_from:
            common.load_init_weights(model, args.init_from)
        settings = common.TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                        patience=args.patience, workers=args.workers,
                                        compile=args.compile, monitor="accuracy", seed=args.seed,
                                        force=args.force)
        meta = {"kind": "classifier", "task": "age_group", "arch": args.arch, "num_classes": len(names),
                "image_size": args.image_size, "age_edges": list(edges), "group_names": names,
                "pretrained": args.pretrained, "init_from": args.init_from, "settings": settings.identity(),
                "splits": common.split_fingerprint(frames, "filestem")}

        def evaluate(trained):
            probs = _predict_probs(trained, datasets["val"], args, info)
            return _classification_metrics(frames["val"]["age_group"].to_numpy(), probs)

        common.log(f"age router {args.arch}: {len(frames['train'])} train / {len(frames['val'])} val "
                   f"images, groups {', '.join(names)}")
        common.fit(model, datasets["train"], frames["train"]["age_group"].to_numpy(),
                   forward=_forward, loss_fn=_loss, evaluate=evaluate, settings=settings, info=info,
                   run_dir=out_dir, checkpoint_meta=meta, balanced=False)
        probs = {split: _predict_probs(model, datasets[split], args, info) for split in datasets}
        if info.is_main:
            metrics = _write_outputs(out_dir, frames, probs, names, args)
            common.log_mlflow_run(mlflow, history_csv=out_dir / "history.csv", metrics={
                f"test_{k}": v for k, v in metrics["test"].items()}, files=[
                out_dir / n for n in ("metrics.json", "confusion.png", "curves.png", "best.pt")])
    finally:
        if mlflow:
            mlflow.end_run()
        common.cleanup_distributed()


def _forward(model, images, batch):
    return model(images)


def _loss(logits, batch):
    import torch.nn.functional as F
    # Label smoothing: neighbouring age groups overlap in maturity, hard 0/1 targets overstate it.
    return F.cross_entropy(logits, batch["target"].long(), label_smoothing=0.05)


def _predict_probs(model, dataset, args, info) -> np.ndarray:
    import torch
    logits = common.predict(model, dataset, _forward, batch_size=args.batch_size, info=info)
    return torch.softmax(torch.from_numpy(logits), dim=1).numpy()


def _classification_metrics(true_groups: np.ndarray, probs: np.ndarray) -> dict:
    from sklearn.metrics import accuracy_score, f1_score
    predicted = probs.argmax(axis=1)
    return {"accuracy": float(accuracy_score(true_groups, predicted)),
            "macro_f1": float(f1_score(true_groups, predicted, average="macro", zero_division=0)),
            "n": int(len(true_groups))}


def classification_metrics_with_ci(true, predicted, groups, n_boot: int = 1000, seed: int = 0) -> dict:
    """Accuracy and macro-F1 of a multi-class prediction with patient-bootstrap 95% intervals
    (macro-F1 over every class seen in `true` or `predicted`, 0 for a class with no true and no
    predicted image in a resample: sklearn's f1_score(labels=..., zero_division=0), tested)."""
    n_rows = len(np.asarray(true))
    statistics = _classification_statistics(true, predicted)
    return {"n": n_rows, **common.estimates_with_ci(statistics, n_rows, groups, n_boot, seed)}


def _classification_statistics(true, predicted) -> Callable[[np.ndarray], dict]:
    """weights [b, n_rows] -> accuracy and macro-F1 of each weighted resample."""
    true, predicted = np.asarray(true), np.asarray(predicted)
    classes = np.unique(np.concatenate([true, predicted]))

    def statistics(weights):
        per_class = []
        for value in classes:
            is_true, is_predicted = true == value, predicted == value
            tp = weights @ (is_true & is_predicted)
            wrong = weights @ (is_true ^ is_predicted)  # false positives + false negatives
            per_class.append(np.nan_to_num(common._ratio(2 * tp, 2 * tp + wrong), nan=0.0))
        return {"accuracy": common._ratio(weights @ (true == predicted), weights.sum(axis=1)),
                "macro_f1": np.mean(per_class, axis=0)}

    return statistics


def _write_outputs(out_dir, frames, probs, names, args) -> dict:
    from sklearn.metrics import confusion_matrix
    rows = []
    for split, frame in frames.items():
        table = frame[["filestem", "patient_id", "projection_name", "age", "age_group"]].copy()
        table.insert(1, "split", split)
        table["age_group_pred"] = probs[split].argmax(axis=1)
        for group in range(len(names)):
            table[f"prob_group{group}"] = probs[split][:, group].round(5)
        rows.append(table)
    predictions = pd.concat(rows, ignore_index=True)
    common.write_csv(predictions, out_dir / "predictions.csv")
    # Accuracy and macro-F1 with patient-bootstrap 95% intervals (a patient's images are correlated).
    metrics = {split: classification_metrics_with_ci(
        frames[split]["age_group"].to_numpy(), probs[split].argmax(axis=1), frames[split]["patient_id"],
        args.bootstrap, args.seed) for split in ("val", "test")}
    metrics["group_names"] = names
    common.write_json(metrics, out_dir / "metrics.json")
    test = predictions[predictions["split"] == "test"]
    matrix = confusion_matrix(test["age_group"], test["age_group_pred"], labels=range(len(names)))
    common.plot_confusion(matrix, names, out_dir / "confusion.png",
                          f"age router, test (accuracy {metrics['test']['accuracy']:.2f})")
    common.plot_training_curves(out_dir / "history.csv", out_dir / "curves.png", "age router", "accuracy")
    common.write_run_config(out_dir, args)
    test = metrics["test"]
    common.log(f"age router test: accuracy {test['accuracy']:.3f} [{test['accuracy_lo']:.3f}, "
               f"{test['accuracy_hi']:.3f}], macro F1 {test['macro_f1']:.3f} (n={test['n']}) -> {out_dir}")
    return metrics


if __name__ == "__main__":
    main()
