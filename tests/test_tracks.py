"""Runs right wherever it is launched: either dataset alone, exact global batches on any number of
ranks, an image cache keyed by the preprocessing code, duplicate file stems resolved the same way."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import common
from conftest import ROOT, load_stage


def _run_all(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "run_all.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ---- independent tracks ----------------------------------------------------------------------

def test_split_stages_run_with_either_dataset_alone(small_demo, tmp_path):
    wrist_out, bone_out = tmp_path / "wrist", tmp_path / "bone"
    wrist_flags = ["--data", str(small_demo / "grazpedwri"), "--out", str(wrist_out), "--preset", "demo"]
    load_stage("01_split_test").main([*wrist_flags, "--per-cell", "2"])
    load_stage("02_split_trainval").main(wrist_flags)
    files = {p.name for p in (wrist_out / "splits").iterdir()}
    assert {"wrist_test.csv", "wrist_train.csv", "wrist_val.csv", "age_groups.json", "group_status.csv"} <= files
    assert not any(name.startswith("boneage") for name in files)
    report = common.read_json(wrist_out / "splits" / "test_report.json")
    assert report["boneage"] is None and report["boneage_data"] is None
    assert "bone-age track skipped" in (wrist_out / "splits" / "split_report.md").read_text()

    bone_flags = ["--boneage-data", str(small_demo / "rsna_boneage"), "--out", str(bone_out), "--preset", "demo"]
    load_stage("01_split_test").main(bone_flags)
    load_stage("02_split_trainval").main(bone_flags)
    files = {p.name for p in (bone_out / "splits").iterdir()}
    assert {"boneage_test.csv", "boneage_train.csv", "boneage_val.csv"} <= files
    assert not any(name.startswith(("wrist", "age_groups", "group_status")) for name in files)
    sizes = [len(common.read_split(bone_out, "boneage", split)) for split in ("train", "val", "test")]
    assert sum(sizes) == len(common.read_boneage_metadata(small_demo / "rsna_boneage")[0])
    assert "wrist track skipped" in (bone_out / "splits" / "split_report.md").read_text()
    with pytest.raises(common.InputError, match="ran without --data"):
        load_stage("02_split_trainval").main([*bone_flags, "--data", str(small_demo / "grazpedwri")])


def test_run_all_with_wrist_data_alone_says_bone_age_is_skipped(small_demo, tmp_path):
    out = tmp_path / "out"
    result = _run_all("--data", str(small_demo / "grazpedwri"), "--out", str(out), "--preset", "demo",
                      "--device", "cpu", "--to", "02", "--extra", "01=--per-cell 2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("bone age (05) skipped: no --boneage-data given") == 1
    assert (out / "splits" / "wrist_train.csv").is_file() and not (out / "splits" / "boneage_test.csv").exists()
    again = _run_all("--data", str(small_demo / "grazpedwri"), "--out", str(out), "--preset", "demo",
                     "--device", "cpu", "--to", "02", "--extra", "01=--per-cell 2")
    assert again.stdout.count("up to date, skipped") == 2  # done means the wrist outputs only


def test_bone_age_track_alone_then_07_predicts_bone_age(small_demo, tmp_path):
    """run_all with only RSNA data runs 01, 02 and 05; 07 predicts bone age from that run."""
    out = tmp_path / "out"
    result = _run_all("--boneage-data", str(small_demo / "rsna_boneage"), "--out", str(out), "--preset", "demo",
                      "--device", "cpu", "--extra", "05=--epochs 1 --image-size 32 --arch test_convnext")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "the wrist track (03, 04, 06) skipped: no --data given" in result.stdout
    assert [line.split("]")[0] for line in result.stdout.splitlines() if "] $ " in line] == \
        ["[stage 01", "[stage 02", "[stage 05", "[stage 08"]
    assert (out / "boneage" / "metrics.json").is_file() and "MAE (months)" in (out / "REPORT.md").read_text()
    assert not (out / "age").exists() and not (out / "fracture").exists()

    hands = sorted((small_demo / "rsna_boneage").rglob("*.png"))[:4]
    table = load_stage("07_predict").main([*map(str, hands), "--models", str(out), "--sex", "F",
                                           "--boneage", "--device", "cpu"])
    assert len(table) == 4 and table["bone_age_months"].between(0, common.BONEAGE_MAX_MONTHS).all()
    assert table["fracture_prob"].isna().all()
    assert pd.read_csv(out / "predictions" / "skipped.csv").empty  # no projection is no problem here
    with pytest.raises(common.InputError, match="for bone age alone add --boneage"):
        load_stage("07_predict").main([str(hands[0]), "--models", str(out), "--sex", "F"])


# ---- exact global batch ----------------------------------------------------------------------

def test_global_batch_is_exact_on_any_number_of_ranks():
    assert common.batch_plan(100, 32, 3) == ([11, 11, 10], 3)
    assert common.batch_plan(100, 32, 1) == ([32], 3)
    assert common.batch_plan(5, 32, 2) == ([3, 2], 1)  # a set smaller than one batch: one step
    with pytest.raises(common.InputError, match="fewer than the 4 processes"):
        common.batch_plan(3, 32, 4)
    with pytest.raises(common.InputError, match="--batch-size 2 is smaller than the 3 processes"):
        common.batch_plan(100, 2, 3)
    labels = np.array([0, 1] * 50)
    single = list(common.EpochSampler(labels, balanced=True, seed=5, epoch_size=96, batch_shares=[32]))
    shards = [list(common.EpochSampler(labels, balanced=True, rank=rank, world_size=3, seed=5, epoch_size=96,
                                       batch_shares=[11, 11, 10])) for rank in range(3)]
    assert [len(shard) for shard in shards] == [33, 33, 30]
    for step in range(3):  # each global batch on 3 ranks is the 1-process batch, split in order
        joined = sum((shard[step * share:(step + 1) * share] for shard, share in zip(shards, [11, 11, 10])), [])
        assert joined == single[step * 32:(step + 1) * 32]


# ---- preprocess-once cache and data folders --------------------------------------------------

def _write_images(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        image = np.random.default_rng(index).integers(0, 60000, size=(40, 24)).astype(np.uint16)
        path = folder / f"img{index}.png"
        cv2.imwrite(str(path), image)
        paths.append(str(path))
    return paths


def _inverted_scale(raw, low_pct=0.5, high_pct=99.5):
    """A changed preprocessing step (bone dark instead of bright)."""
    low, high = np.percentile(raw, [low_pct, high_pct])
    return (1.0 - np.clip((raw - low) / max(high - low, 1e-6), 0.0, 1.0)).astype(np.float32)


def test_a_preprocessing_change_invalidates_the_cache(tmp_path, monkeypatch, capsys):
    paths = _write_images(tmp_path / "images", 5)
    before = common.build_image_cache(paths, 32, tmp_path / "cache", "t")
    pixels = np.array(before.open())
    key = common.preprocessing_key()
    assert common.preprocessing_key() == key
    capsys.readouterr()
    common.build_image_cache(paths, 32, tmp_path / "cache", "t")
    assert "all 5 images cached" in capsys.readouterr().out

    monkeypatch.setattr(common, "scale_to_unit", _inverted_scale)
    assert common.preprocessing_key() != key
    after = common.build_image_cache(paths, 32, tmp_path / "cache", "t")
    assert "decoded 5 images" in capsys.readouterr().out
    for path in paths:  # the cached pixels are the new preprocessing's, not the stale ones
        expected, _ = common.preprocess_image(Path(path), 32)
        assert np.array_equal(after.open()[after.rows[path]], expected)
        assert not np.array_equal(after.open()[after.rows[path]], pixels[before.rows[path]])


def test_duplicate_stems_resolve_the_same_way_and_are_counted(small_demo, tmp_path, monkeypatch):
    data = tmp_path / "graz"
    shutil.copytree(small_demo / "grazpedwri", data)
    original = sorted((data / "images_part1").glob("*.png"))[0]
    copy_dir = data / "images_part0"  # sorts first: its copy must win on every copy of the data
    copy_dir.mkdir()
    duplicate = copy_dir / original.name
    shutil.copy(original, duplicate)
    walk = os.walk

    def reversed_walk(top, **kwargs):  # a file system that lists entries in the other order
        for folder, dirs, files in reversed(list(walk(top, **kwargs))):
            yield folder, dirs, list(reversed(files))

    first = common.index_images(data)
    monkeypatch.setattr(common.os, "walk", reversed_walk)
    second = common.index_images(data)
    assert first == second and first[original.stem] == duplicate.resolve()
    assert list(first.duplicates) == [original.stem] and first.duplicates[original.stem] == [original.resolve()]
    monkeypatch.undo()

    out = tmp_path / "out"
    load_stage("01_split_test").main(["--data", str(data), "--out", str(out), "--preset", "demo", "--per-cell", "2"])
    counted = common.read_json(out / "splits" / "test_report.json")["wrist"]["duplicate_stems"]
    assert counted["stems"] == 1 and counted["ignored_files"] == 1
    assert counted["examples"][original.stem][0] == str(duplicate.resolve())
