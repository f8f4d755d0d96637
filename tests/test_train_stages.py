"""Stages 03 and 04 on a small generated demo: outputs, DDP partitioning with torchrun restart and
resume, fail-fast, two nodes, stale router predictions, bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
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


def _torchrun(script: str, flags: list[str], *, env_extra: dict | None = None, nproc: int = 2,
              max_restarts: int = 1, timeout: int = 400) -> subprocess.CompletedProcess:
    """One CPU launch of `script` on `nproc` gloo ranks; torchrun may restart crashed workers."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "--max-restarts", str(max_restarts), script, *flags]
    return _run(command, {"OMP_NUM_THREADS": "1", **(env_extra or {})}, timeout=timeout)


def _assert_partitioned(audit: dict, world_size: int, shares: list[int]) -> None:
    """Rank 0's record of one epoch: disjoint draws, each rank its share of every global batch."""
    assert audit["world_size"] == world_size and audit["batch_shares"] == shares
    by_rank = audit["indices_by_rank"]
    steps = audit["intended_samples"] // sum(shares)
    assert [len(indices) for indices in by_rank] == [steps * share for share in shares]
    assert sum(len(indices) for indices in by_rank) == audit["intended_samples"]
    # With --sampler none and no cycling an epoch is a permutation: no image is drawn twice.
    assert not set(by_rank[0]) & set(by_rank[1])


def test_04_two_ranks_uneven_batch_crash_restart_and_resume(split_out, tmp_path):
    """ONE torchrun launch, 2 gloo ranks, the demo architecture: an odd global batch (15 = 8 + 7)
    stays exact, rank 0 crashes after epoch 1, torchrun restarts both workers and they resume
    from last.pt; checked from what rank 0 wrote."""
    out, flags = split_out
    run_out = _copy_splits(out, tmp_path / "ddp04")
    launch = _torchrun("04_train_fracture_ddp.py", [
        *flags[:4], "--preset", "demo", "--out", str(run_out), "--image-size", "48", "--device", "cpu",
        "--batch-size", "15", "--projections", "Lat", "--groups", "2", "--epochs", "3", "--patience", "10",
        "--sampler", "none", "--min-epoch-samples", "0", "--bootstrap", "50",
        "--init", "scratch"],  # one crash hook per model: the pooled start on 2 ranks has its own test
        env_extra={"PIPELINE_CRASH_AFTER_EPOCH": "1", "PIPELINE_CRASH_RANK": "0"})
    logs = launch.stdout + launch.stderr
    assert launch.returncode == 0, logs[-4000:]
    assert "exits on purpose" in logs and "resuming" in logs and "after epoch 1" in logs
    folder = run_out / "fracture" / "Lat" / "group2"
    history = pd.read_csv(folder / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3]
    n_train = len(common.read_split(run_out, "wrist", "train").query("projection_name == 'Lat' and age_group == 2"))
    assert history["samples_seen"].tolist() == [(n_train // 15) * 15 * k for k in (1, 2, 3)]
    _assert_partitioned(json.loads((folder / "sample_audit.json").read_text()), 2, [8, 7])
    assert torch.load(folder / "best.pt", weights_only=True)["threshold"] is not None
    assert (run_out / "fracture" / "summary.csv").is_file()  # rank 0 finished after the restart


def test_03_two_ranks_swin_crash_restart_and_resume(split_out, tmp_path):
    """The router's full-preset family (Swin) as a tiny member, 2 ranks, crash on rank 1 and resume."""
    out, flags = split_out
    run_out = _copy_splits(out, tmp_path / "ddp03")
    launch = _torchrun("03_train_age.py", [
        *flags[:4], "--preset", "demo", "--out", str(run_out), "--arch", "test_swin", "--image-size", "48",
        "--device", "cpu", "--batch-size", "32", "--epochs", "2", "--patience", "10"],
        env_extra={"PIPELINE_CRASH_AFTER_EPOCH": "1", "PIPELINE_CRASH_RANK": "1"})
    logs = launch.stdout + launch.stderr
    assert launch.returncode == 0, logs[-4000:]
    assert "rank 1 exits on purpose" in logs and "resuming" in logs
    assert pd.read_csv(run_out / "age" / "history.csv")["epoch"].tolist() == [1, 2]
    _assert_partitioned(json.loads((run_out / "age" / "sample_audit.json").read_text()), 2, [16, 16])
    checkpoint = torch.load(run_out / "age" / "best.pt", weights_only=True)
    assert checkpoint["arch"] == "test_swin" and checkpoint["image_size"] == 48
    predictions = pd.read_csv(run_out / "age" / "predictions.csv")
    assert len(predictions) == sum(len(common.read_split(run_out, "wrist", s)) for s in ("train", "val", "test"))


def test_an_error_on_one_rank_ends_the_launch_in_seconds(split_out, tmp_path):
    """Rank 1 fails after its first step while rank 0 waits in the next all-reduce: the launch
    must end within seconds of the error, non-zero, with rank 1's message."""
    out, flags = split_out
    run_out = _copy_splits(out, tmp_path / "fail")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "03_train_age.py", *flags[:4], "--preset", "demo", "--out", str(run_out), *FAST, "--epochs", "2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PIPELINE_FAIL_RANK": "1"}
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    failed_at, lines = None, []
    for line in process.stdout:
        lines.append(line)
        if failed_at is None and "injected failure on rank 1" in line:
            failed_at = time.monotonic()
    code = process.wait(timeout=120)
    ended = time.monotonic()
    logs = "".join(lines)
    assert code != 0 and failed_at is not None, logs[-3000:]
    assert "[rank 1 of 2]" in logs
    assert ended - failed_at < 15, (ended - failed_at, logs[-3000:])
    assert ended - started < 60, ended - started


def test_two_nodes_share_one_out_and_draw_disjoint_samples(split_out, tmp_path):
    """Two torchrun launchers on this machine as two nodes (c10d rendezvous on 127.0.0.1), one
    shared --out, one model of 04 in the full preset's family (a tiny ConvNeXtV2): the nodes draw
    disjoint samples and the image cache is decoded by one node only."""
    import socket
    out, flags = split_out
    run_out = tmp_path / "nodes"  # the splits without the shared cache: building it once is under test
    shutil.copytree(out / "splits", run_out / "splits")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
         "--local-addr", "127.0.0.1", "04_train_fracture_ddp.py", *flags[:4], "--preset", "demo",
         "--out", str(run_out), "--arch", "test_convnextv2", *FAST, "--projections", "AP",
         "--groups", "2", "--epochs", "2", "--sampler", "none", "--min-epoch-samples", "0",
         "--bootstrap", "50"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    logs = [launcher.communicate(timeout=400)[0] for launcher in launchers]
    assert all(launcher.returncode == 0 for launcher in launchers), logs[0][-3000:] + logs[1][-3000:]
    both = logs[0] + logs[1]
    assert both.count("image cache wrist_48.npy: decoded") == 1, both[-4000:]
    assert both.count("image cache wrist_48.npy: all") == 1, both[-4000:]
    folder = run_out / "fracture" / "AP" / "group2"
    _assert_partitioned(json.loads((folder / "sample_audit.json").read_text()), 2, [8, 8])
    assert pd.read_csv(folder / "history.csv")["epoch"].tolist() == [1, 2]
    assert torch.load(folder / "best.pt", weights_only=True)["arch"] == "test_convnextv2"
    assert (run_out / "fracture" / "summary.csv").is_file()


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
