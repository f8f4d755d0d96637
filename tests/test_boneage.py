"""Bone age: the three RSNA CSV layouts, the sex-aware bounded model, stage 05 end to end, on 2
ranks with a torchrun restart, and resuming only what the same code, data and settings made.

The stage runs on tiny generated split CSVs (not 01/02), so these tests depend on nothing but
common.py and 05_train_boneage.py. Whether the demo preset really learns is measured on the full
demo (too slow for CI; see the stage's docstring).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from sklearn.metrics import mean_absolute_error

import common
from conftest import ROOT, load_stage

SMOKE_FLAGS = ["--epochs", "1", "--image-size", "32", "--batch-size", "8", "--device", "cpu",
               "--workers", "0", "--preset", "demo", "--arch", "resnet10t"]
OUTPUT_FILES = ["best.pt", "last.pt", "history.csv", "predictions.csv", "metrics.json",
                "scatter.png", "bland_altman.png", "config.json"]


def write_hand(path: Path, months: float, seed: int) -> None:
    """A small 8-bit 'hand' whose bright area grows with bone age (enough for a smoke run)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 40, size=(40, 32)).astype(np.uint8)
    rows = 4 + int(30 * months / 240)
    image[4:rows, 8:24] = 200
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), image)


# ---------------------------------------------------------------------------------------------
# Reading the published CSVs unchanged
# ---------------------------------------------------------------------------------------------

def test_reads_the_three_rsna_csv_layouts(tmp_path):
    # Training set, Kaggle copy: the image folder is nested inside a folder of the same name.
    train = tmp_path / "train"
    (train / "boneage-training-dataset.csv").parent.mkdir(parents=True)
    (train / "boneage-training-dataset.csv").write_text("id,boneage,male\n1377,180,False\n1378,12,True\n")
    for image_id in (1377, 1378):
        write_hand(train / "boneage-training-dataset" / "boneage-training-dataset" / f"{image_id}.png", 100, image_id)
    # Validation set: other column names, male written TRUE/FALSE as spreadsheets export it.
    val = tmp_path / "val"
    val.mkdir()
    (val / "validation.csv").write_text("Image ID,male,Bone Age (months)\n1386,TRUE,30\n1392,FALSE,162\n")
    for image_id in (1386, 1392):
        write_hand(val / "boneage-validation-dataset-1" / f"{image_id}.png", 100, image_id)
    # Test set ground truth: Case ID, Sex as M/F, and one row without an image.
    test = tmp_path / "test"
    test.mkdir()
    (test / "test_gt.csv").write_text("Case ID,Sex,Ground truth bone age (months)\n"
                                      "4360,M,168.93\n4361,F,169.65\n4362,M,100\n")
    for image_id in (4360, 4361):
        write_hand(test / "images" / f"{image_id}.png", 100, image_id)

    frame, excluded = common.read_boneage_metadata(train)  # the folder: finds the training CSV
    assert frame["id"].tolist() == ["1377", "1378"]
    assert frame["boneage"].tolist() == [180.0, 12.0]
    assert frame["male"].tolist() == [False, True] and frame["sex"].tolist() == ["F", "M"]
    assert all(Path(p).is_file() for p in frame["image_path"])

    frame, _ = common.read_boneage_metadata(val / "validation.csv")
    assert frame.set_index("id")["boneage"].to_dict() == {"1386": 30.0, "1392": 162.0}
    assert frame.set_index("id")["male"].to_dict() == {"1386": True, "1392": False}

    frame, excluded = common.read_boneage_metadata(test / "test_gt.csv")
    assert frame.set_index("id")["sex"].to_dict() == {"4360": "M", "4361": "F"}
    assert frame["boneage"].tolist() == pytest.approx([168.93, 169.65])
    assert excluded["image not found"] == 1


# ---------------------------------------------------------------------------------------------
# The model: sex matters, predictions stay in range
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def boneage_model():
    torch.manual_seed(0)
    return common.build_boneage_model("resnet10t", init_months=120.0).eval()


def test_sex_input_changes_the_prediction(boneage_model):
    image = torch.rand(1, 1, 32, 32).repeat(2, 1, 1, 1)  # the same hand twice
    with torch.no_grad():
        girl, boy = boneage_model(image, torch.tensor([0, 1])).tolist()
    assert abs(girl - boy) > 1e-3


def test_predictions_stay_within_zero_and_240_months(boneage_model):
    black = torch.full((2, 1, 32, 32), (0.0 - common.PIXEL_MEAN) / common.PIXEL_STD)
    white = torch.full((2, 1, 32, 32), (1.0 - common.PIXEL_MEAN) / common.PIXEL_STD)
    male = torch.tensor([0, 1])
    with torch.no_grad():
        outputs = [boneage_model(black, male), boneage_model(white, male),
                   boneage_model(torch.randn(2, 1, 32, 32) * 50, male)]
        head = boneage_model.head[-1]
        saved = head.weight.clone(), head.bias.clone()
        for bias in (1e4, -1e4):  # a head pushed far past either end
            head.bias.fill_(bias)
            outputs.append(boneage_model(white, male))
        head.bias.copy_(saved[1])
        head.weight.mul_(1e4)
        outputs.append(boneage_model(black, male))
        head.weight.copy_(saved[0])
    months = torch.cat(outputs)
    assert torch.isfinite(months).all()
    assert (months >= 0).all() and (months <= common.BONEAGE_MAX_MONTHS).all()
    assert outputs[0].min() > 0 and outputs[0].max() < common.BONEAGE_MAX_MONTHS


def test_init_months_starts_at_the_training_mean():
    torch.manual_seed(0)
    model = common.build_boneage_model("resnet10t", init_months=60.0).eval()
    with torch.no_grad():
        months = model(torch.zeros(4, 1, 32, 32), torch.tensor([0, 1, 0, 1]))
    assert months.mean().item() == pytest.approx(60.0, abs=5.0)


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------

def make_splits(out: Path, sizes=(("train", 48), ("val", 12), ("test", 12))) -> Path:
    """boneage_{train,val,test}.csv as 01/02 write them, over tiny generated hands."""
    rng = np.random.default_rng(0)
    next_id = 1000
    for split, count in sizes:
        rows = []
        for _ in range(count):
            months = float(rng.integers(6, 228))
            male = bool(rng.integers(0, 2))
            path = out / "images" / f"{next_id}.png"
            write_hand(path, months, next_id)
            rows.append({"id": str(next_id), "boneage": months, "male": male, "sex": "M" if male else "F",
                         "image_path": str(path), "age_bin": int(months // 12)})
            next_id += 1
        common.write_csv(pd.DataFrame(rows), common.split_path(out, "boneage", split))
    return out


def test_stage_writes_every_output(tmp_path):
    out = make_splits(tmp_path)
    load_stage("05_train_boneage").main(["--out", str(out), *SMOKE_FLAGS])
    run_dir = out / "boneage"
    for name in OUTPUT_FILES:
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["val"]) == {"mae", "n"} and metrics["val"]["n"] == 12
    assert set(metrics["test"]) >= {"mae", "mae_ci", "n", "baseline_mae", "rmse", "r2", "bias", "by_sex",
                                    "by_age_band"} and metrics["test"]["n"] == 12
    low, high = metrics["test"]["mae_ci"]
    assert low <= metrics["test"]["mae"] <= high

    test = common.read_split(out, "boneage", "test")
    assert metrics["test"]["baseline_mae"] == pytest.approx(mean_absolute_error(
        test["boneage"], np.full(len(test), common.read_split(out, "boneage", "train")["boneage"].mean())))
    predictions = pd.read_csv(run_dir / "predictions.csv", dtype={"id": str})
    assert list(predictions.columns) == ["id", "sex", "true_months", "predicted_months"]
    assert predictions["id"].tolist() == test["id"].tolist()
    assert predictions["predicted_months"].between(0, common.BONEAGE_MAX_MONTHS).all()

    # 07_predict rebuilds the model from best.pt alone and, through the same cache and
    # preprocessing, reproduces the stage's test predictions.
    model, checkpoint = common.load_trained_model(run_dir / "best.pt")
    assert checkpoint["kind"] == "boneage" and checkpoint["image_size"] == 32
    assert checkpoint["init_months"] == pytest.approx(common.read_split(out, "boneage", "train")["boneage"].mean())
    images = np.stack([common.preprocess_image(Path(p), checkpoint["image_size"])[0] for p in test["image_path"]])
    images = common.prepare_images(torch.from_numpy(images).unsqueeze(1), torch.device("cpu"),
                                   train=False, channels_last=False)
    with torch.no_grad():
        months = model(images, torch.tensor(test["male"].astype(int).to_numpy())).numpy()
    assert months == pytest.approx(predictions["predicted_months"].to_numpy(), abs=0.02)


def test_two_ranks_convnext_crash_restart_and_resume(tmp_path):
    """ONE torchrun launch, 2 gloo ranks, a tiny ConvNeXt (the family whose unused head norm broke
    DDP at the second step): an odd global batch (9 = 5 + 4), rank 1 crashes after epoch 1,
    torchrun restarts both workers and they resume from last.pt. Checked from what rank 0 wrote."""
    out = make_splits(tmp_path)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--max-restarts", "1", str(ROOT / "tests" / "fault_launcher.py"), "05_train_boneage.py",
               "--out", str(out), *SMOKE_FLAGS,
               "--arch", "test_convnext", "--epochs", "3", "--batch-size", "9"]  # the last flag wins
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PIPELINE_CRASH_AFTER_EPOCH": "1",
                   "PIPELINE_CRASH_RANK": "1"}
    run = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=400)
    logs = run.stdout + run.stderr
    assert run.returncode == 0, logs[-4000:]
    assert "2 process(es)" in run.stdout and "rank 1 exits on purpose" in logs
    assert "resuming" in run.stdout and "after epoch 1" in run.stdout
    history = pd.read_csv(out / "boneage" / "history.csv")
    assert history["epoch"].tolist() == [1, 2, 3]
    assert history["samples_seen"].tolist() == [45, 90, 135]  # 48 // 9 = 5 global batches of 9
    audit = json.loads((out / "boneage" / "sample_audit.json").read_text())
    first, second = audit["indices_by_rank"]
    assert audit["world_size"] == 2 and audit["batch_shares"] == [5, 4]
    assert len(first) == 25 and len(second) == 20
    assert not set(first) & set(second)  # each rank trains on its own share of every batch
    checkpoint = torch.load(out / "boneage" / "best.pt", weights_only=True)
    assert checkpoint["arch"] == "test_convnext" and checkpoint["epoch"] in (1, 2, 3)
    metrics = json.loads((out / "boneage" / "metrics.json").read_text())
    assert metrics["val"]["n"] == 12 and metrics["test"]["n"] == 12  # every image scored once
    assert len(pd.read_csv(out / "boneage" / "predictions.csv")) == 12


@pytest.mark.parametrize("arch, size", [("resnet10t", 32), ("test_convnext", 32), ("test_convnextv2", 32),
                                        ("test_swin", 64)])
def test_every_parameter_gets_a_gradient(arch, size):
    """The root of DDP's 'Expected to have finished reduction': a parameter that never gets a
    gradient. Every family 03/04 offer must build a bone-age model that owns none."""
    torch.manual_seed(0)
    model = common.build_boneage_model(arch, init_months=100.0, image_size=size)
    months = model(torch.randn(4, 1, size, size), torch.tensor([0, 1, 0, 1]))
    months.sum().backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    assert 1.0 < model.pool.p.item() < 6.0


def test_rerun_resumes_only_the_same_code_and_force_retrains(tmp_path, monkeypatch, capsys):
    out = make_splits(tmp_path)
    stage = load_stage("05_train_boneage")
    flags = ["--out", str(out), *SMOKE_FLAGS]
    stage.main(flags)
    assert "epoch   1/1" in capsys.readouterr().out
    stage.main(flags)  # finished, same code/data/settings: resumes and trains no epoch
    printed = capsys.readouterr().out
    assert "resuming" in printed and "epoch   1/1" not in printed
    stage.main([*flags, "--force"])  # --force: from scratch
    printed = capsys.readouterr().out
    assert "--force, training from scratch" in printed and "epoch   1/1" in printed
    monkeypatch.setattr(common, "code_fingerprint", lambda forward: "other code")
    stage.main(flags)  # a code change: not resumed
    printed = capsys.readouterr().out
    assert "written by other code; training from scratch" in printed and "epoch   1/1" in printed
    assert pd.read_csv(out / "boneage" / "history.csv")["epoch"].tolist() == [1]


def test_code_fingerprint_follows_the_stage_file(tmp_path):
    """The hash covers the file that defines forward (the stage), not just its name."""
    import importlib.util

    def forward_from(text: str, name: str):
        path = tmp_path / f"{name}.py"
        path.write_text(text)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.forward

    source = "def forward(model, images, batch):\n    return model(images)\n"
    same = common.code_fingerprint(forward_from(source, "stage_a"))
    assert common.code_fingerprint(forward_from(source, "stage_a")) == same
    assert common.code_fingerprint(forward_from(source + "# a fix\n", "stage_a")) != same


def test_a_relabelled_image_changes_the_data_fingerprint(tmp_path):
    out = make_splits(tmp_path, sizes=(("train", 6),))
    frame = common.read_split(out, "boneage", "train")
    cache = common.build_image_cache(frame["image_path"], 32, tmp_path / "cache", "b")

    def make(months):
        return common.CachedImageDataset(cache, frame["image_path"], target=months)

    months = frame["boneage"].to_numpy(np.float32)
    assert common.dataset_fingerprint(make(months)) == common.dataset_fingerprint(make(months.copy()))
    relabelled = months.copy()
    relabelled[0] += 12
    assert common.dataset_fingerprint(make(relabelled)) != common.dataset_fingerprint(make(months))


@pytest.mark.parametrize("flags, message", [
    (["--arch", "resnet10tt"], "not a timm architecture"),
    (["--pretrained", "missing.safetensors"], "weights file not found"),
])
def test_bad_flags_fail_in_one_line(tmp_path, flags, message):
    out = make_splits(tmp_path, sizes=(("train", 2), ("val", 1), ("test", 1)))
    with pytest.raises(common.InputError, match=message):
        load_stage("05_train_boneage").main(["--out", str(out), *SMOKE_FLAGS, *flags])


def test_missing_split_names_the_stage_to_run(tmp_path):
    with pytest.raises(common.InputError, match="02_split_trainval.py"):
        load_stage("05_train_boneage").main(["--out", str(tmp_path), *SMOKE_FLAGS])
