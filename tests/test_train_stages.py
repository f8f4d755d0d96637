"""Stages 03 and 04 on a small generated demo: outputs, DDP partitioning, resume, bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import common
from conftest import ROOT, load_stage

FAST = ["--image-size", "48", "--batch-size", "16", "--device", "cpu"]


@pytest.fixture(scope="module")
def split_out(small_demo, tmp_path_factory):
    """Splits of the small demo (2 test images per cell) in a fresh output folder."""
    out = tmp_path_factory.mktemp("out")
    flags = ["--data", str(small_demo / "grazpedwri"), "--boneage-data", str(small_demo / "rsna_boneage"),
             "--out", str(out), "--preset", "demo"]
    load_stage("01_split_test").main([*flags, "--per-cell", "2"])
    load_stage("02_split_trainval").main(flags)
    return out, flags


def _copy_splits(source: Path, target: Path) -> Path:
    shutil.copytree(source / "splits", target / "splits")
    return target


def _run(args: list[str], env_extra: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_router_writes_predictions_for_every_image(split_out):
    out, flags = split_out
    load_stage("03_train_age").main([*flags, *FAST, "--epochs", "2"])
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


def test_fracture_stage_outputs_and_skips(split_out):
    out, flags = split_out
    load_stage("04_train_fracture_ddp").main([*flags, *FAST, "--epochs", "2", "--bootstrap", "100"])
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


def test_two_rank_gloo_run_partitions_the_epoch(split_out, tmp_path):
    """torchrun, 2 CPU processes: disjoint draws, the intended epoch covered once, same metrics as 1 process."""
    out, flags = split_out
    common_flags = [*flags[:4], "--preset", "demo", *FAST, "--projections", "AP", "--groups", "2",
                    "--epochs", "2", "--sampler", "none", "--min-epoch-samples", "0", "--bootstrap", "50",
                    "--init", "scratch"]  # the pooled start on 2 ranks: test_subtle_training.py
    one = _copy_splits(out, tmp_path / "one")
    load_stage("04_train_fracture_ddp").main([*common_flags, "--out", str(one)])
    two = _copy_splits(out, tmp_path / "two")
    result = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "04_train_fracture_ddp.py", *common_flags, "--out", str(two)])
    audit_path = two / "fracture" / "AP" / "group2" / "sample_audit.json"
    assert audit_path.is_file(), result.stdout[-2000:] + result.stderr[-2000:]
    audit = json.loads(audit_path.read_text())
    ranks = [set(indices) for indices in audit["indices_by_rank"]]
    n_train = len(pd.read_csv(two / "splits" / "wrist_train.csv").query("projection_name == 'AP' and age_group == 2"))
    per_rank_batch = 16 // 2
    assert audit["world_size"] == 2
    assert len(audit["indices_by_rank"][0]) == len(audit["indices_by_rank"][1])  # equal shares
    assert not ranks[0] & ranks[1]  # no sample drawn by both ranks
    assert len(ranks[0] | ranks[1]) == audit["intended_samples"] == (n_train // 2 // per_rank_batch) * per_rank_batch * 2
    one_val = pd.read_csv(one / "fracture" / "AP" / "group2" / "history.csv")["val_auc"]
    two_val = pd.read_csv(two / "fracture" / "AP" / "group2" / "history.csv")["val_auc"]
    assert len(one_val) == len(two_val) == 2
    # Same global batches and schedule; only per-rank BatchNorm statistics and augmentation draws differ.
    assert abs(one_val.iloc[-1] - two_val.iloc[-1]) < 0.15, (one_val.tolist(), two_val.tolist())
    assert (two / "fracture" / "summary.csv").is_file()  # rank 0 finished and wrote the summary


def test_killed_training_resumes_from_last_checkpoint(split_out, tmp_path):
    out, flags = split_out
    run_out = _copy_splits(out, tmp_path / "resume")
    command = [sys.executable, "04_train_fracture_ddp.py", *flags[:4], "--preset", "demo", *FAST,
               "--projections", "Lat", "--groups", "2", "--epochs", "3", "--patience", "10",
               "--bootstrap", "50", "--init", "scratch", "--out", str(run_out)]
    crashed = _run(command, {"PIPELINE_CRASH_AFTER_EPOCH": "1"})
    assert crashed.returncode == 17, crashed.stderr[-2000:]
    folder = run_out / "fracture" / "Lat" / "group2"
    assert torch.load(folder / "last.pt", weights_only=True)["epoch"] == 1
    assert not (run_out / "fracture" / "summary.csv").exists()
    resumed = _run(command)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout and "after epoch 1" in resumed.stdout
    history = pd.read_csv(folder / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3]
    assert history["samples_seen"].is_monotonic_increasing
    assert (run_out / "fracture" / "summary.csv").is_file()


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
