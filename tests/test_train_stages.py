"""Stages 03 and 04 on a small generated demo: outputs, stale router predictions, bad input.
(Their 2-rank, restart, fail-fast and two-node launches: test_distributed.py.)"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import common
from conftest import ROOT, load_stage

FAST = ["--image-size", "48", "--batch-size", "16", "--device", "cpu"]


@pytest.fixture(scope="module")
def split_out(small_demo, demo_splits, tmp_path_factory):
    """Splits of the small demo (2 test images per cell; the session's) in a fresh output folder."""
    out = demo_splits.copy_to(tmp_path_factory.mktemp("out"))
    flags = ["--data", str(small_demo / "grazpedwri"), "--boneage-data", str(small_demo / "rsna_boneage"),
             "--out", str(out), "--preset", "demo"]
    return out, flags


def _copy_splits(source: Path, target: Path) -> Path:
    shutil.copytree(source / "splits", target / "splits")
    (target / "cache").symlink_to((source / "cache").resolve(), target_is_directory=True)  # decode once
    return target


def _run(args: list[str], env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_router_writes_predictions_for_every_image(trained_run):
    out = trained_run.out
    predictions = pd.read_csv(out / "age" / "predictions.csv", dtype={"filestem": str})
    sizes = {split: len(common.read_split(out, "wrist", split)) for split in ("train", "val", "test")}
    assert predictions["split"].value_counts().to_dict() == sizes
    groups = len(common.read_age_edges(out)) + 1
    probabilities = predictions[[f"prob_group{g}" for g in range(groups)]].to_numpy()
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-3)
    assert (predictions["age_group_pred"] == probabilities.argmax(axis=1)).all()
    metrics = json.loads((out / "age" / "metrics.json").read_text())
    assert set(metrics["test"]) >= {"accuracy", "macro_f1", "n"} and metrics["test"]["n"] == sizes["test"]
    checkpoint = torch.load(out / "age" / "best.pt", weights_only=True)
    assert checkpoint["num_classes"] == groups and checkpoint["task"] == "age_group"
    assert (out / "age" / "confusion.png").stat().st_size > 0


def test_fracture_stage_outputs_and_skips(trained_run):
    out = trained_run.out  # 04 after 03: its predicted-group cascade reads the router's predictions
    summary = pd.read_csv(out / "fracture" / "summary.csv")
    models = summary[summary["kind"] == "model"]
    assert len(models) == 8  # AP and Lat x 4 age groups: trained or skipped with a reason
    assert (models.loc[models["status"] == "skipped", "reason"].str.len() > 0).all()
    trained = models[models["status"] == "trained"]
    assert len(trained) >= 4
    for row in trained.itertuples():
        folder = out / "fracture" / row.projection / f"group{int(row.age_group)}"
        for name in ("best.pt", "last.pt", "history.csv", "metrics.json", "roc.png", "confusion.png"):
            assert (folder / name).is_file(), folder / name
        metrics = json.loads((folder / "metrics.json").read_text())
        assert set(metrics["test"]) >= {"auc", "auc_ci", "accuracy", "f1", "sensitivity", "specificity", "threshold", "n"}
        checkpoint = torch.load(folder / "best.pt", weights_only=True)
        assert checkpoint["threshold"] == pytest.approx(metrics["test"]["threshold"])
        history = pd.read_csv(folder / "history.csv")
        assert list(history.columns[:3]) == ["epoch", "train_loss", "val_auc"]
        assert {"lr", "images_per_s", "samples_seen"} <= set(history.columns)
    assert {"cascade_true_group", "cascade_pred_group", "study_max_true_group"} <= set(summary["kind"])
    predictions = pd.read_csv(out / "fracture" / "test_predictions.csv")
    assert len(predictions) == len(common.read_split(out, "wrist", "test"))
    assert predictions["prob_route_true"].dropna().between(0, 1).all()


def test_router_predictions_for_other_splits_are_refused(split_out, tmp_path):
    out, flags = split_out
    run_out = _copy_splits(out, tmp_path / "stale")
    train = common.read_split(run_out, "wrist", "train")
    rows = [{"filestem": stem, "split": split, "age_group_pred": 0}
            for split in ("train", "val", "test") for stem in common.read_split(run_out, "wrist", split)["filestem"]]
    stale = pd.DataFrame(rows)
    stale.loc[stale["filestem"] == train["filestem"].iloc[0], "split"] = "test"  # 02 was rerun since
    (run_out / "age").mkdir()
    stale.to_csv(run_out / "age" / "predictions.csv", index=False)
    with pytest.raises(common.InputError, match="made for other splits.*rerun 03_train_age.py"):
        load_stage("04_train_fracture_ddp").main([*flags[:4], "--out", str(run_out), "--groups", "2", "--epochs", "1"])
    stale["split"] = [row["split"] for row in rows]  # the same splits: accepted
    stale.to_csv(run_out / "age" / "predictions.csv", index=False)
    routed = load_stage("04_train_fracture_ddp")._read_routed_splits(
        load_stage("04_train_fracture_ddp").parse_args([*flags[:4], "--out", str(run_out)]))
    assert (routed["train"]["age_group_pred"] == 0).all()


def test_route_pred_needs_the_router(split_out, tmp_path):
    out, flags = split_out
    bare = _copy_splits(out, tmp_path / "bare")
    with pytest.raises(common.InputError, match="03_train_age.py"):
        load_stage("04_train_fracture_ddp").main([*flags[:4], "--out", str(bare), "--route", "pred"])


@pytest.mark.parametrize("extra, message", [
    (["--arch", "convnextv9_huge"], "not a timm architecture"),
    (["--device", "cuda"], "no CUDA GPU"),
    (["--pretrained", "missing_weights.safetensors"], "weights file not found"),
])
def test_bad_training_flags_fail_in_one_line(split_out, tmp_path, extra, message):
    if "--device" in extra and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out, flags = split_out
    with pytest.raises(common.InputError, match=message):
        load_stage("04_train_fracture_ddp").main([*flags, "--out", str(_copy_splits(out, tmp_path / "x")),
                                                  "--groups", "2", "--epochs", "1", *extra])
