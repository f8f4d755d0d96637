"""Tests of common.py: readers, image loading, cache, sampler, losses, metrics, checkpoints."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

import common
from conftest import cr_dicom, load_stage

fracture_stage = load_stage("04_train_fracture_ddp")
predict_stage = load_stage("07_predict")
split_test_stage = load_stage("01_split_test")


# ---- data readers ---------------------------------------------------------------------------

def _placeholder_dataset(tmp_path: Path, source_csv: Path) -> Path:
    """The real dataset.csv with an empty placeholder PNG per row (readers never decode them)."""
    root = tmp_path / "graz"
    (root / "images_part1").mkdir(parents=True)
    shutil.copy(source_csv, root / "dataset.csv")
    for stem in pd.read_csv(source_csv, encoding="utf-8-sig", usecols=["filestem"])["filestem"]:
        (root / "images_part1" / f"{stem}.png").touch()
    return root


def test_real_metadata_counts(reference_dir, tmp_path):
    root = _placeholder_dataset(tmp_path, reference_dir / "grazpedwri_dx_metadata.csv")
    raw = pd.read_csv(root / "dataset.csv", encoding="utf-8-sig")
    assert raw.columns.tolist() == common.GRAZ_COLUMNS  # the byte-order mark is stripped
    assert len(raw) == 20327 and raw["patient_id"].nunique() == 6091
    assert (raw["projection"] == 3).sum() == 93
    assert (raw["metal"] == 1).sum() == 708
    assert (raw["fracture_visible"] == 1).sum() == 13550

    kept, excluded = common.read_wrist_metadata(root, exclude_metal=True)
    assert len(kept) + sum(excluded.values()) == 20327
    assert excluded["oblique projection"] == 93
    assert excluded["metal implant"] == 708 - 3  # three metal rows are oblique, counted there
    assert set(kept["projection_name"]) == {"AP", "Lat"}
    assert kept["label"].sum() == ((raw["fracture_visible"] == 1) & (raw["projection"] != 3)
                                   & (raw["metal"] != 1)).sum()
    everything, excluded_none = common.read_wrist_metadata(root, exclude_metal=False)
    assert len(everything) == 20327 - 93 and excluded_none["oblique projection"] == 93


def test_ao_filter_keeps_normals_and_splits_on_commas(tmp_path):
    root = tmp_path / "graz"
    (root / "images").mkdir(parents=True)
    rows = [("0001_1_01_WRI-L1_M010", "23r-M/2.1; 23u-E/7", 1), ("0002_2_01_WRI-L1_M010", "", 0),
            ("0003_3_01_WRI-L1_M010", "22r-D/4.1", 1), ("0004_4_01_WRI-L1_M010", "22u-D/1.1,23u-E/7", 1)]
    frame = pd.DataFrame({c: [""] * len(rows) for c in common.GRAZ_COLUMNS})
    frame["filestem"] = [r[0] for r in rows]
    frame["ao_classification"] = [r[1] for r in rows]
    frame["fracture_visible"] = [r[2] or "" for r in rows]
    frame["patient_id"] = range(1, 5)
    frame["study_number"] = 1
    frame["age"] = 10.0
    frame["projection"] = 1
    frame["gender"] = "M"
    frame.to_csv(root / "dataset.csv", index=False, encoding="utf-8-sig")
    for stem in frame["filestem"]:
        (root / "images" / f"{stem}.png").touch()
    kept, excluded = common.read_wrist_metadata(root, ao_pattern=r"^23u")
    assert sorted(kept["patient_id"]) == ["1", "2", "4"]  # ids are text, as every reader gives them
    assert excluded["AO code not matching"] == 1


def test_bad_wrist_inputs_give_one_line_errors(tmp_path):
    with pytest.raises(common.InputError, match="data folder not found"):
        common.read_wrist_metadata(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.InputError, match="dataset.csv not found"):
        common.read_wrist_metadata(tmp_path / "empty")
    root = tmp_path / "nocol"
    root.mkdir()
    pd.DataFrame({"filestem": ["a"], "age": [3]}).to_csv(root / "dataset.csv", index=False)
    with pytest.raises(common.InputError, match="missing required column"):
        common.read_wrist_metadata(root)
    frame = pd.DataFrame({c: [""] for c in common.GRAZ_COLUMNS})
    frame[["filestem", "patient_id", "study_number", "age", "projection"]] = ["x", 1, 1, 5.0, 1]
    frame.to_csv(root / "dataset.csv", index=False)
    with pytest.raises(common.InputError, match="no images"):
        common.read_wrist_metadata(root)
    frame.assign(patient_id="").to_csv(root / "dataset.csv", index=False)  # text ids: '' is no patient
    with pytest.raises(common.InputError, match="dataset.csv: empty patient_id or study_number"):
        common.read_wrist_metadata(root)


def test_nan_age_is_a_counted_skip(tmp_path):
    root = tmp_path / "graz"
    (root / "images").mkdir(parents=True)
    frame = pd.DataFrame({c: [""] * 3 for c in common.GRAZ_COLUMNS})
    frame["filestem"] = ["a", "b", "c"]
    frame["patient_id"] = [1, 2, 3]
    frame["study_number"] = 1
    frame["age"] = [5.0, None, 7.5]
    frame["projection"] = 1
    frame.to_csv(root / "dataset.csv", index=False)
    for stem in "abc":
        (root / "images" / f"{stem}.png").touch()
    kept, excluded = common.read_wrist_metadata(root)
    assert len(kept) == 2 and excluded["age missing"] == 1


# ---- age groups -------------------------------------------------------------------------------

def test_age_groups_are_half_open():
    edges = split_test_stage.parse_age_edges("5,10,15")
    assert common.age_group_of([0, 4.99, 5.0, 9.99, 10.0, 14.9, 15.0, 19.0], edges).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert common.age_group_names(edges) == ["[0,5)", "[5,10)", "[10,15)", "[15,inf)"]
    assert common.age_group_of([7.9, 8.0, 15.0], split_test_stage.parse_age_edges("8,15")).tolist() == [0, 1, 2]
    with pytest.raises(common.InputError):
        split_test_stage.parse_age_edges("10,5")


# ---- images ---------------------------------------------------------------------------------

def test_16bit_png_keeps_contrast(tmp_path):
    gradient = np.linspace(30000, 60000, 400 * 200).reshape(400, 200).astype(np.uint16)
    path = tmp_path / "wide.png"
    cv2.imwrite(str(path), gradient)
    raw = common.read_raw_image(path)
    assert raw.min() >= 30000 and raw.max() <= 60000  # read as 16-bit, not clipped to 255
    square, box = common.preprocess_image(path, 96)
    inside = square[box.top:box.top + round(box.height * box.scale), box.left:box.left + round(box.width * box.scale)]
    assert inside.min() < 10 and inside.max() > 245  # full contrast, not saturated white
    assert np.unique(inside).size > 100


def test_8bit_and_color_images_load(tmp_path):
    gray = (np.arange(100 * 60) % 256).reshape(100, 60).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "g.jpg"), gray)
    cv2.imwrite(str(tmp_path / "c.png"), np.dstack([gray] * 3))
    for name in ("g.jpg", "c.png"):
        square, _ = common.preprocess_image(tmp_path / name, 64)
        assert square.shape == (64, 64) and square.dtype == np.uint8 and square.max() > 200


def test_letterbox_keeps_aspect_ratio():
    image = np.ones((400, 200), dtype=np.float32)
    square, box = common.letterbox(image, 128)
    assert square.shape == (128, 128)
    filled_cols = np.flatnonzero(square.max(axis=0) > 0)
    filled_rows = np.flatnonzero(square.max(axis=1) > 0)
    assert len(filled_rows) == 128 and len(filled_cols) == 64  # 2:1 stays 2:1
    assert box.left == 32 and box.top == 0 and box.scale == pytest.approx(0.32)



def test_monochrome1_dicom_is_inverted_bone_bright():
    import pydicom
    path = cr_dicom()
    dataset = pydicom.dcmread(path)
    assert dataset.PhotometricInterpretation == "MONOCHROME1"
    raw_stored = dataset.pixel_array.astype(float)
    loaded = common.read_raw_image(path)
    # In this CR of a lower leg, columns ~480-580 are direct exposure (air beside the limb) and
    # columns ~800-1000 the limb. MONOCHROME1 stores air high (displayed black); after loading,
    # air must be dark and the limb bright, as a radiologist sees it.
    air, limb = np.s_[400:1400, 480:580], np.s_[400:1400, 800:1000]
    assert raw_stored[air].mean() > raw_stored[limb].mean()
    assert loaded[air].mean() < loaded[limb].mean()
    square, box = common.preprocess_image(path, 176)  # scale 0.1: the same columns / 10
    assert square[40:140, 48:58].mean() < square[40:140, 80:100].mean()


def test_dicom_tags_are_non_identifying():
    tags = predict_stage.read_dicom_tags(cr_dicom())
    assert set(tags) == {"projection", "view_source", "age", "sex", "laterality", "study_key"}
    assert tags["projection"] == "AP"
    assert predict_stage._dicom_age_years("011Y") == 11 and predict_stage._dicom_age_years("006M") == 0.5


# ---- cache -----------------------------------------------------------------------------------

def test_cache_is_built_once_reused_and_rebuilt_on_change(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(300):
        path = tmp_path / "img" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        cv2.imwrite(str(path), rng.integers(8000, 60000, (640, 320)).astype(np.uint16))
        paths.append(str(path))
    (tmp_path / "img" / "corrupt.png").write_bytes(b"not a png")
    paths.append(str(tmp_path / "img" / "corrupt.png"))

    start = time.perf_counter()
    for path in paths[:-1]:  # what an epoch costs when every image is decoded every time
        common.preprocess_image(path, 96)
    decode_epoch = time.perf_counter() - start

    cache = common.build_image_cache(paths, 96, tmp_path / "cache", "t", workers=2)
    assert list(cache.errors) == [paths[-1]]  # a counted skip, not a crash
    frame = pd.DataFrame({"image_path": paths})
    assert len(common.drop_unreadable(frame, cache, "test")) == 300

    dataset = common.CachedImageDataset(cache, paths[:-1], target=np.zeros(300))
    cache_epochs = []
    for _ in range(3):  # the fastest of three passes: a busy machine can stall one pass for tens of ms
        start = time.perf_counter()
        for i in range(len(dataset)):
            dataset[i]
        cache_epochs.append(time.perf_counter() - start)
    cache_epoch = min(cache_epochs)
    print(f"\none epoch of 300 images: decoding {decode_epoch:.3f} s, from the cache {cache_epoch:.4f} s "
          f"({decode_epoch / cache_epoch:.0f}x)")
    assert decode_epoch / cache_epoch >= 50

    expected, _ = common.preprocess_image(paths[5], 96)
    assert np.array_equal(cache.open()[cache.rows[paths[5]]], expected)
    mtime = Path(cache.array_path).stat().st_mtime_ns
    again = common.build_image_cache(paths, 96, tmp_path / "cache", "t")
    assert Path(again.array_path).stat().st_mtime_ns == mtime  # reused, not rebuilt

    cv2.imwrite(paths[5], np.full((640, 320), 30000, np.uint16))  # a source file changed
    changed = common.build_image_cache(paths, 96, tmp_path / "cache", "t")
    assert changed.open()[changed.rows[paths[5]]].max() == 0  # constant image -> re-decoded
    unchanged, _ = common.preprocess_image(paths[6], 96)
    assert np.array_equal(changed.open()[changed.rows[paths[6]]], unchanged)  # reused rows intact


# ---- sampler, losses, models ------------------------------------------------------------------

def test_balanced_sampler_gives_disjoint_equal_shares():
    labels = np.array([1] * 700 + [0] * 300)
    for epoch in range(3):
        shares = []
        for rank in range(2):
            sampler = common.EpochSampler(labels, balanced=True, rank=rank, world_size=2, seed=7)
            sampler.set_epoch(epoch)
            shares.append(list(sampler))
        full = common.EpochSampler(labels, balanced=True, seed=7, world_size=2)
        full.set_epoch(epoch)
        draw = full.epoch_indices()
        assert len(shares[0]) == len(shares[1]) == 500
        assert sorted(shares[0] + shares[1]) == sorted(draw.tolist())  # shares partition the draw
        assert labels[draw].mean() == pytest.approx(0.5)  # balanced
        # positions are disjoint: rank r owns draw[r::2]
        assert shares[0] == draw[0::2].tolist() and shares[1] == draw[1::2].tolist()
    unbalanced = [list(common.EpochSampler(labels, balanced=False, rank=r, world_size=2, seed=1)) for r in range(2)]
    assert not set(unbalanced[0]) & set(unbalanced[1])
    assert len(set(unbalanced[0]) | set(unbalanced[1])) == 1000


def test_balanced_sampler_is_balanced_in_expectation_per_rank():
    labels = np.array([1] * 900 + [0] * 100)
    fractions = []
    for epoch in range(20):
        sampler = common.EpochSampler(labels, balanced=True, rank=1, world_size=2, seed=3)
        sampler.set_epoch(epoch)
        fractions.append(labels[list(sampler)].mean())
    assert np.mean(fractions) == pytest.approx(0.5, abs=0.02)


def test_focal_loss_with_gamma_zero_is_alpha_weighted_bce():
    torch.manual_seed(0)
    logits, targets = torch.randn(64), (torch.rand(64) > 0.3).float()
    alpha = 0.3
    weights = alpha * targets + (1 - alpha) * (1 - targets)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, weight=weights)
    assert common.binary_focal_loss(logits, targets, alpha=alpha, gamma=0.0).item() == pytest.approx(expected.item(), rel=1e-5)
    # gamma > 0 down-weights easy examples: a confident correct logit contributes almost nothing
    easy = common.binary_focal_loss(torch.tensor([6.0]), torch.tensor([1.0]), alpha=0.5, gamma=2.0)
    hard = common.binary_focal_loss(torch.tensor([-2.0]), torch.tensor([1.0]), alpha=0.5, gamma=2.0)
    assert easy.item() < 1e-5 < hard.item()


def test_gem_pooling_is_learnable_and_between_mean_and_max():
    gem = common.build_gem(p=3.0)
    assert gem.p.item() == pytest.approx(3.0)
    x = torch.randn(2, 4, 5, 5) * 3  # signed, as ConvNeXt features are
    pooled = gem(x)
    assert pooled.shape == (2, 4)
    positive = torch.nn.functional.softplus(x)  # GeM pools softplus(x): non-negative by construction
    assert torch.all(pooled >= positive.mean(dim=(2, 3)) - 1e-5) and torch.all(pooled <= positive.amax(dim=(2, 3)) + 1e-5)
    assert gem.p.requires_grad
    pooled.sum().backward()
    assert (x.requires_grad is False) and gem.raw_p.grad is not None
    # a negative activation still moves the output (a clamp at eps would zero its gradient)
    x = torch.full((1, 1, 2, 2), -2.0, requires_grad=True)
    gem(x).sum().backward()
    assert torch.all(x.grad > 0)
    # the exponent stays within (1, p_max) however far the raw parameter is pushed
    with torch.no_grad():
        for raw in (-1e4, 1e4):
            gem.raw_p.fill_(raw)
            assert 1.0 <= gem.p.item() <= 6.0


def test_model_factory_errors(tmp_path, monkeypatch):
    with pytest.raises(common.InputError, match="not a timm architecture"):
        common.create_model("resnet10", num_classes=1)
    with pytest.raises(common.InputError, match="weights file not found"):
        common.create_model("resnet10t", num_classes=1, pretrained=str(tmp_path / "missing.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(common.InputError, match="--pretrained PATH"):
        common.create_model("resnet10t", num_classes=1, pretrained="download")


def test_pretrained_weights_load_from_a_local_file(tmp_path):
    source = common.create_model("resnet10t", num_classes=1000, in_chans=3)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    model = common.create_model("resnet10t", num_classes=1, pretrained=str(tmp_path / "weights.pth"))
    # timm folds the RGB stem to one channel by summing, and keeps the rest unchanged
    assert torch.allclose(model.conv1[0].weight, source.conv1[0].weight.sum(1, keepdim=True))
    assert torch.equal(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)


# ---- metrics ----------------------------------------------------------------------------------

def test_binary_metrics_match_scikit_learn():
    from sklearn.metrics import accuracy_score, average_precision_score, f1_score, recall_score, roc_auc_score
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    probs = np.clip(labels * 0.3 + rng.random(300) * 0.7, 0, 1)
    metrics = fracture_stage.binary_metrics(labels, probs, 0.5)
    predicted = probs >= 0.5
    assert metrics["auc"] == pytest.approx(roc_auc_score(labels, probs))
    assert metrics["pr_auc"] == pytest.approx(average_precision_score(labels, probs))
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    assert metrics["f1"] == pytest.approx(f1_score(labels, predicted))
    assert metrics["sensitivity"] == pytest.approx(recall_score(labels, predicted))
    assert metrics["specificity"] == pytest.approx(recall_score(1 - labels, ~predicted))


def test_youden_threshold_separates_a_separable_set():
    labels = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    threshold = fracture_stage.youden_threshold(labels, probs)
    assert 0.3 < threshold <= 0.6
    assert fracture_stage.binary_metrics(labels, probs, threshold)["accuracy"] == 1.0


def test_patient_bootstrap_is_wider_than_image_bootstrap_for_clustered_data():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(1)
    patients = np.repeat(np.arange(40), 10)  # 10 near-identical images per patient
    labels = np.repeat(rng.integers(0, 2, 40), 10)
    scores = np.repeat(rng.random(40), 10) + labels * 0.3 + rng.normal(0, 0.01, 400)
    _, by_patient = common.auc_with_ci(labels, scores, patients, n_boot=300)
    _, by_image = common.auc_with_ci(labels, scores, np.arange(400), n_boot=300)
    assert by_patient[0] < roc_auc_score(labels, scores) < by_patient[1]
    assert by_patient[1] - by_patient[0] > 1.5 * (by_image[1] - by_image[0])


# ---- checkpoints and files ------------------------------------------------------------------

def test_checkpoint_round_trip_and_refusal_of_code(tmp_path):
    model = common.create_model("resnet10t", num_classes=1)
    path = common.save_checkpoint({"kind": "classifier", "arch": "resnet10t", "num_classes": 1,
                                   "state_dict": model.state_dict(), "threshold": 0.4}, tmp_path / "best.pt")
    loaded, checkpoint = common.load_trained_model(path)
    assert checkpoint["threshold"] == 0.4
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    torch.save({"bad": Path("x")}, tmp_path / "code.pt")  # a pickled class: not weights-only
    with pytest.raises(common.InputError, match="cannot load the checkpoint"):
        common.load_checkpoint(tmp_path / "code.pt")
    with pytest.raises(common.InputError, match="not found"):
        common.load_checkpoint(tmp_path / "absent.pt")


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "table.csv"
    common.write_csv(pd.DataFrame({"a": [1]}), target)
    with pytest.raises(RuntimeError):
        with common.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert pd.read_csv(target)["a"].tolist() == [1]
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_unwritable_output_folder_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(common.InputError, match="cannot write there"):
        common.ensure_writable_dir(blocker / "sub")


def test_import_torch_leaves_the_collector_on_and_the_libraries_frozen():
    """A fresh process, as a stage starts: the libraries' objects are out of the collector's
    reach, and the collector runs again for everything made afterwards."""
    import subprocess
    import sys
    code = ("import gc, sys, common; common.import_torch(); "
            "print(gc.isenabled(), gc.get_freeze_count(), 'torchvision' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], cwd=common.ROOT, capture_output=True, text=True, timeout=120)
    enabled, frozen, torchvision = run.stdout.split()
    assert enabled == "True" and torchvision == "True", run.stdout + run.stderr[-2000:]
    assert int(frozen) > 100_000  # timm, torch and torchvision hold millions of objects
