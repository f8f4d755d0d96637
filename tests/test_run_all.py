"""run_all.py end to end on a small demo: every output, skip when up to date, bad input in one line."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import QUICK, data_flags, run_all

def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_error(result: subprocess.CompletedProcess, *phrases: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors, result.stderr[-3000:]
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr[-3000:]


def test_every_stage_output_and_the_report(trained_run):
    """The session's run of every stage (conftest.trained_run): run_all.py's own outputs."""
    out, stdout = trained_run.out, trained_run.stdout
    for name in ["splits/wrist_test.csv", "splits/wrist_train.csv", "splits/boneage_val.csv",
                 "splits/split_report.md", "age/best.pt", "age/predictions.csv", "age/metrics.json",
                 "fracture/summary.csv", "fracture/test_predictions.csv", "boneage/best.pt",
                 "boneage/metrics.json", "boneage/predictions.csv", "boneage/scatter.png",
                 "gradcam/index.csv", "REPORT.md"]:
        assert (out / name).is_file(), name
    report = (out / "REPORT.md").read_text()
    for heading in ("## Data and splits", "## Age-group router (03)", "## Fracture models (04)",
                    "## Bone age (05)", "## Grad-CAM++ (06)", "## Reproduce"):
        assert heading in report
    assert "leak check: PASS" in report
    # the exact commands are recorded; one CPU process needs no torchrun launcher
    assert "python 04_train_fracture_ddp.py --out" in report and "torch.distributed.run" not in report
    # every stage's command line is printed so it can be copied and rerun
    assert stdout.count("$ ") >= 6


def test_torchrun_launches_a_stage_only_where_it_adds_something(tmp_path):
    """Plain `python STAGE.py` for one process on one node; torchrun for ranks, nodes or restarts."""
    import run_all as runner

    def command(*flags):
        args = runner.parse_args(["--out", str(tmp_path), "--device", "cpu", *flags])
        return {stage.name: runner._command(stage, args) for stage in runner.STAGES}

    one = command()
    assert all(c[1] == stage.script for stage, c in zip(runner.STAGES, one.values())), one
    for flags, launcher in ((["--nproc-per-node", "2"], ["--nproc-per-node", "2", "--max-restarts", "0"]),
                            (["--max-restarts", "1"], ["--nproc-per-node", "1", "--max-restarts", "1"]),
                            (["--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:29500"], ["--nnodes", "2"])):
        launched = command(*flags)
        for stage in runner.STAGES:
            if stage.distributed:
                line = " ".join(launched[stage.name])
                assert line.startswith(f"{sys.executable} -m torch.distributed.run ") and \
                    " ".join(launcher) in line and line.endswith(" ".join(one[stage.name][2:])), line
            else:
                assert launched[stage.name] == one[stage.name]


def test_second_run_trains_nothing_even_in_a_moved_folder(trained_run, small_demo, tmp_path):
    out = trained_run.copy_to(tmp_path / "moved")  # up to date wherever the run folder now lies
    before = digest(out / "fracture")
    start = time.perf_counter()
    again = run_all(*data_flags(small_demo), "--out", str(out), *QUICK)
    seconds = time.perf_counter() - start
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("up to date, skipped") == 7, again.stdout  # 01-06 and the report (08)
    assert "epoch" not in again.stdout
    assert digest(out / "fracture") == before
    assert seconds < 60, seconds


def test_changed_settings_rerun_only_that_stage_and_later(trained_run, small_demo, tmp_path):
    out = trained_run.copy_to(tmp_path / "changed")
    changed = [*QUICK[:-2], "--extra", "06=--max-per-model 1"]
    result = run_all(*data_flags(small_demo), "--out", str(out), *changed)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("up to date, skipped") == 5
    assert "[stage 06] $" in result.stdout


def test_failed_stage_leaves_earlier_outputs_intact(trained_run, small_demo, tmp_path):
    copy = trained_run.copy_to(tmp_path / "copy")
    before = digest(copy / "splits")
    result = run_all(*data_flags(small_demo), "--out", str(copy), *QUICK, "--only", "04",
                     "--extra", "04=--arch convnextv9_huge")
    assert_one_line_error(result, "not a timm architecture", "stage 04 failed")
    assert digest(copy / "splits") == before
    assert pd.read_csv(copy / "fracture" / "summary.csv").equals(pd.read_csv(trained_run.out / "fracture" / "summary.csv"))


def test_missing_data_folder(tmp_path):
    result = run_all("--data", str(tmp_path / "nowhere"), "--boneage-data", str(tmp_path / "nowhere2"),
                     "--out", str(tmp_path / "out"), "--preset", "demo", "--device", "cpu")
    assert_one_line_error(result, "not found")


def test_dataset_csv_without_a_required_column(small_demo, tmp_path):
    data = tmp_path / "graz"
    shutil.copytree(small_demo / "grazpedwri", data)
    frame = pd.read_csv(data / "dataset.csv", encoding="utf-8-sig", dtype=str)
    frame.drop(columns=["fracture_visible"]).to_csv(data / "dataset.csv", index=False)
    result = run_all("--data", str(data), "--boneage-data", str(small_demo / "rsna_boneage"),
                     "--out", str(tmp_path / "out"), "--preset", "demo", "--device", "cpu", "--only", "01")
    assert_one_line_error(result, "fracture_visible", "dataset.csv")


def test_every_image_missing(small_demo, tmp_path):
    data = tmp_path / "graz"
    data.mkdir()
    shutil.copy(small_demo / "grazpedwri" / "dataset.csv", data / "dataset.csv")
    result = run_all("--data", str(data), "--boneage-data", str(small_demo / "rsna_boneage"),
                     "--out", str(tmp_path / "out"), "--preset", "demo", "--device", "cpu", "--only", "01")
    assert_one_line_error(result, "no images")


def test_one_corrupt_png_is_a_counted_skip(small_demo, tmp_path):
    data = tmp_path / "graz"
    shutil.copytree(small_demo / "grazpedwri", data)
    victim = sorted(data.rglob("*.png"))[0]
    victim.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    flags = ["--data", str(data), "--boneage-data", str(small_demo / "rsna_boneage"), "--out", str(out),
             "--preset", "demo", "--device", "cpu", "--to", "03", "--extra", "01=--per-cell 2",
             "--extra", "03=--epochs 1 --image-size 48"]
    result = run_all(*flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped 1 unreadable image" in result.stdout + result.stderr
    predictions = pd.read_csv(out / "age" / "predictions.csv", dtype={"filestem": str})
    assert victim.stem not in set(predictions["filestem"])


def test_cuda_without_a_gpu(small_demo, tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = run_all(*data_flags(small_demo), "--out", str(tmp_path / "out"), "--preset", "demo",
                     "--device", "cuda", "--extra", "01=--per-cell 2", "--to", "03")
    assert_one_line_error(result, "no CUDA GPU")


def test_unwritable_output_folder(small_demo, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = run_all(*data_flags(small_demo), "--out", str(blocker / "out"), "--preset", "demo", "--device", "cpu")
    assert_one_line_error(result, "cannot write there")
