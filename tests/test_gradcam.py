"""Grad-CAM++ (06): the maps point where the evidence is, for ConvNeXt and Swin; the letterbox is
undone on the original image; the stage writes overlays, grids and index.csv from 04's outputs.

The localisation tests train tiny models until they separate noise images with a bright blob
(positive) from noise alone, then place the blob in each quadrant in turn and require the hottest
quadrant of the Grad-CAM++ map to be the blob's. The blob moves during training, so the model must
detect it where it is; probing all four quadrants catches what a single known corner would not: an
all-zero map (whose "hottest" quadrant is the first, top-left) and a transposed one (top-left stays
top-left). The Swin test also shows that reading its channels-last stage as channels-first fails.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

import common
from conftest import load_stage

SIZE = 64
QUADRANTS = ["top-left", "top-right", "bottom-left", "bottom-right"]


@pytest.fixture(scope="module")
def gradcam():
    return load_stage("06_gradcam")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """64-px models are too small to gain from threads; on a busy 2-core machine two threads made
    the ConvNeXt test 5x slower (57 s instead of 10 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# The map points at the evidence
# ---------------------------------------------------------------------------------------------

def blob_images(centres: list, rng: np.random.Generator) -> np.ndarray:
    """uint8 [N, 64, 64] noise, plus a bright Gaussian blob at each centre that is not None."""
    rows, cols = np.mgrid[:SIZE, :SIZE]
    images = rng.normal(0.35, 0.08, (len(centres), SIZE, SIZE))
    for image, centre in zip(images, centres):
        if centre is not None:
            image += 0.6 * np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (2 * 5.0 ** 2))
    return np.clip(images * 255, 0, 255).astype(np.uint8)


def random_batch(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 2, count)
    centres = [tuple(rng.integers(6, SIZE - 6, 2)) if label else None for label in labels]
    return blob_images(centres, rng), labels


def train_until_separated(model, lr: float, max_steps: int = 600):
    """Fresh batches until the smoothed loss is below 0.1 (a few hundred steps); then check the
    separation on held-out images. Clipping keeps a from-scratch ConvNeXt from diverging."""
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    smoothed = 0.7
    for step in range(max_steps):
        images, labels = random_batch(16, rng)
        logits = model(_as_input(images)).squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(labels).float())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        smoothed = 0.9 * smoothed + 0.1 * loss.item()
        if step >= 50 and smoothed < 0.1:
            break
    model.eval()
    images, labels = random_batch(128, np.random.default_rng(1))
    with torch.no_grad():
        logits = model(_as_input(images)).squeeze(1).numpy()
    gap = logits[labels == 1].mean() - logits[labels == 0].mean()
    assert roc_auc_score(labels, logits) > 0.98 and gap > 2, \
        f"the tiny model did not learn the blob in {step + 1} steps (logit gap {gap:.2f})"
    return model


def _as_input(images: np.ndarray):
    # The same normalisation as training and 06 (common.prepare_images, no augmentation).
    return common.prepare_images(torch.from_numpy(images).unsqueeze(1), torch.device("cpu"),
                                 train=False, channels_last=False)


def probe_images() -> tuple[np.ndarray, list[str]]:
    """Two positives per quadrant, the blob well inside it."""
    rng = np.random.default_rng(2)
    half = SIZE // 2
    centres, truth = [], []
    for name, (top, left) in zip(QUADRANTS, [(0, 0), (0, half), (half, 0), (half, half)]):
        for _ in range(2):
            centres.append((top + rng.integers(10, half - 10), left + rng.integers(10, half - 10)))
            truth.append(name)
    return blob_images(centres, rng), truth


def hottest_quadrants(cams: np.ndarray) -> list[str]:
    half = SIZE // 2
    return [QUADRANTS[int(np.argmax([cam[:half, :half].mean(), cam[:half, half:].mean(),
                                     cam[half:, :half].mean(), cam[half:, half:].mean()]))] for cam in cams]


def test_convnext_cam_points_at_the_evidence(gradcam):
    # convnext_atto shrunk to one block per stage; output_stride 8 keeps an 8x8 last-stage map at
    # 64 px (the standard stride 32 leaves 2x2, too coarse to localise anything).
    torch.manual_seed(0)
    model = common.create_model("convnext_atto", num_classes=1, depths=(1, 1, 1, 1),
                                dims=(16, 24, 32, 48), output_stride=8)
    model = train_until_separated(model, lr=1e-3)
    assert common.target_layers_for(model) == [model.stages[-1]]
    assert common.reshape_transform_for(model) is None

    images, truth = probe_images()
    cams, probs = common.grad_cam_plus_plus(model, images, torch.device("cpu"))
    assert cams.shape == (8, SIZE, SIZE) and cams.min() >= 0 and cams.max() == pytest.approx(1.0)
    assert hottest_quadrants(cams) == truth
    with torch.no_grad():
        expected = torch.sigmoid(model(_as_input(images)).squeeze(1)).numpy()
    assert probs == pytest.approx(expected, abs=1e-5) and (probs > 0.5).all()


def test_swin_cam_points_at_the_evidence(gradcam, monkeypatch):
    torch.manual_seed(0)
    model = common.create_model("swin_tiny_patch4_window7_224", num_classes=1, img_size=SIZE,
                                window_size=4, embed_dim=24, depths=(1, 1), num_heads=(1, 2),
                                drop_path_rate=0.0)
    model = train_until_separated(model, lr=2e-3)
    assert common.target_layers_for(model) == [model.layers[-1]]
    assert common.reshape_transform_for(model) is common.to_channels_first

    images, truth = probe_images()
    cams, _ = common.grad_cam_plus_plus(model, images, torch.device("cpu"))
    assert hottest_quadrants(cams) == truth

    # The control: Swin's stage output is channels-LAST; read as channels-first (the original
    # code's mistake) the map no longer follows the blob.
    monkeypatch.setattr(common, "reshape_transform_for", lambda model: None)
    wrong, _ = common.grad_cam_plus_plus(model, images, torch.device("cpu"))
    assert sum(a == b for a, b in zip(hottest_quadrants(wrong), truth)) <= 4


def test_target_layers_for_each_family(gradcam):
    convnextv2 = common.create_model("convnextv2_atto", num_classes=1)
    assert common.target_layers_for(convnextv2) == [convnextv2.stages[-1]]
    resnet = common.create_model("resnet10t", num_classes=1)
    assert common.target_layers_for(resnet) == [resnet.layer4[-1]]
    assert common.reshape_transform_for(resnet) is None
    with pytest.raises(common.InputError, match="no target layer known for EfficientNet"):
        common.target_layers_for(common.create_model("test_efficientnet", num_classes=1))


def test_channels_last_maps_and_token_sequences_become_channels_first(gradcam):
    nhwc = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    assert torch.equal(common.to_channels_first(nhwc), nhwc.permute(0, 3, 1, 2))
    grid = torch.randn(2, 4, 4, 8)
    tokens = torch.cat([torch.full((2, 1, 8), 99.0), grid.reshape(2, 16, 8)], dim=1)  # + class token
    assert torch.equal(common.to_channels_first(tokens), grid.permute(0, 3, 1, 2))


# ---------------------------------------------------------------------------------------------
# The overlay sits on the original image
# ---------------------------------------------------------------------------------------------

def write_png16(path: Path, height: int, width: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    image = rng.integers(5000, 60000, (height, width)).astype(np.uint16)
    image[height // 4: height // 2, width // 3: 2 * width // 3] = 65000  # a bright "bone"
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), image)
    return path


def test_overlay_undoes_the_letterbox(gradcam, tmp_path):
    path = write_png16(tmp_path / "tall.png", 150, 90, seed=0)
    square, box = common.preprocess_image(path, SIZE)
    assert (box.height, box.width) == (150, 90) and box.left > 0  # padded left and right
    unit = common.scale_to_unit(common.read_raw_image(path))

    # A map that is hot only on the padding must leave no trace on the original image.
    region_h, region_w = round(box.height * box.scale), round(box.width * box.scale)
    padding_only = np.ones((SIZE, SIZE), dtype=np.float32)
    padding_only[box.top:box.top + region_h, box.left:box.left + region_w] = 0.0
    assert (square[padding_only == 1] == 0).all()  # it really is the black padding
    overlay = common.overlay_on_original(unit, padding_only, box)
    blank = common.overlay_on_original(unit, np.zeros((SIZE, SIZE), np.float32), box)
    assert overlay.shape == (150, 90, 3) and overlay.dtype == np.uint8
    assert np.array_equal(overlay, blank)

    # A map hot on the image's top-left corner colours the original's top-left corner.
    corner = np.zeros((SIZE, SIZE), dtype=np.float32)
    corner[box.top:box.top + 16, box.left:box.left + 10] = 1.0
    hot = common.overlay_on_original(unit, corner, box).astype(int)
    red_minus_blue = hot[..., 0] - hot[..., 2]  # the jet colour map: 1 is red, 0 is blue
    assert red_minus_blue[:30, :20].mean() > 30 and red_minus_blue[60:, 40:].mean() < -30

    # The caption goes in a banner above the image, not over it.
    captioned = common.add_caption(overlay, common.caption(0.8123, 0.41, label=1, outcome="TP"))
    assert captioned.shape[1] == 90 and captioned.shape[0] > 150
    assert np.array_equal(captioned[-150:], overlay)


def test_overlay_of_a_large_image_is_shrunk(gradcam):
    unit = np.random.default_rng(0).random((2400, 1200), dtype=np.float32)
    square, box = common.letterbox(unit, SIZE)
    overlay = common.overlay_on_original(unit, np.zeros((SIZE, SIZE), np.float32), box)
    assert overlay.shape == (1024, 512, 3)


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------

def test_choose_images_shows_errors_first(gradcam):
    frame = pd.DataFrame({"filestem": list("abcdefgh"),
                          "label": [1, 1, 0, 0, 1, 1, 0, 0],
                          "prob": [0.9, 0.6, 0.8, 0.3, 0.2, 0.45, 0.1, 0.55]})
    chosen = gradcam.choose_images(frame, threshold=0.5, limit=5)
    # TP a (0.9, surest first), FP c (0.8), FN e (0.2, clearest miss), then TP b, FP h.
    assert chosen["filestem"].tolist() == ["a", "c", "e", "b", "h"]
    assert chosen["outcome"].tolist() == ["TP", "FP", "FN", "TP", "FP"]
    everything = gradcam.choose_images(frame, threshold=0.5, limit=0)
    assert len(everything) == 8 and everything["outcome"].tolist()[-2:] == ["TN", "TN"]


def fake_fracture_run(out: Path, n_images: int = 8) -> pd.DataFrame:
    """What 01 and 04 leave behind, made cheaply: a test split, test predictions, one model."""
    rows = []
    for i in range(n_images):
        stem = f"{i:04d}_100{i}_01_WRI-L1_M009"
        path = write_png16(out.parent / "images" / f"{stem}.png", 80 + 4 * i, 48, seed=i)
        rows.append({"filestem": stem, "patient_id": i, "study_number": 1, "projection_name": "AP",
                     "age": 9.0, "age_group": 1, "age_group_pred": 1, "label": i % 2,
                     "prob_route_true": 0.1 + 0.1 * i, "prob_route_pred": 0.1 + 0.1 * i,
                     "image_path": str(path)})
    frame = pd.DataFrame(rows)
    common.write_csv(frame.drop(columns=["prob_route_true", "prob_route_pred"]),
                     common.split_path(out, "wrist", "test"))
    common.write_csv(frame.drop(columns=["image_path"]), out / "fracture" / "test_predictions.csv")
    model = common.create_model("resnet10t", num_classes=1)
    common.save_checkpoint({"kind": "classifier", "task": "fracture", "arch": "resnet10t",
                            "num_classes": 1, "image_size": 32, "projection": "AP", "age_group": 1,
                            "age_edges": [5.0, 10.0, 15.0], "route": "true", "threshold": 0.5,
                            "state_dict": model.state_dict()}, out / "fracture" / "AP" / "group1" / "best.pt")
    return frame


def test_stage_writes_overlays_grid_and_index(gradcam, tmp_path):
    out = tmp_path / "out"
    frame = fake_fracture_run(out)
    flags = ["--out", str(out), "--preset", "demo", "--device", "cpu", "--batch-size", "3"]
    gradcam.main([*flags, "--max-per-model", "5"])

    index = pd.read_csv(out / "gradcam" / "index.csv", dtype={"filestem": str})
    assert index.columns.tolist() == ["projection", "age_group", "filestem", "label", "prob",
                                      "threshold", "outcome", "overlay"]
    assert len(index) == 5 and set(index["projection"]) == {"AP"} and set(index["age_group"]) == {1}
    assert index["prob"].between(0, 1).all() and (index["threshold"] == 0.5).all()
    for row in index.itertuples():
        assert row.outcome == gradcam.outcome_of(row.label, row.prob, row.threshold)
        assert row.overlay == f"gradcam/AP/group1/{row.filestem}_p{row.prob:.2f}_y{row.label}.png"
        overlay = cv2.imread(str(out / row.overlay))
        original = cv2.imread(frame.set_index("filestem").loc[row.filestem, "image_path"], cv2.IMREAD_UNCHANGED)
        assert overlay.shape[1] == original.shape[1] and overlay.shape[0] > original.shape[0]
    assert (out / "gradcam" / "AP" / "group1" / "grid.png").is_file()
    assert (out / "gradcam" / "config.json").is_file()

    # A rerun with fewer images leaves exactly the overlays its index lists.
    gradcam.main([*flags, "--max-per-model", "2"])
    index = pd.read_csv(out / "gradcam" / "index.csv")
    written = sorted(p.name for p in (out / "gradcam" / "AP" / "group1").glob("*.png"))
    assert written == sorted([Path(p).name for p in index["overlay"]] + ["grid.png"])


def test_missing_fracture_outputs_name_the_stage_to_run(gradcam, tmp_path):
    with pytest.raises(common.InputError, match="04_train_fracture_ddp.py"):
        gradcam.main(["--out", str(tmp_path), "--preset", "demo", "--device", "cpu"])
    fake_fracture_run(tmp_path / "out")
    (tmp_path / "out" / "fracture" / "AP" / "group1" / "best.pt").unlink()
    with pytest.raises(common.InputError, match="no trained fracture model.*04_train_fracture_ddp.py"):
        gradcam.main(["--out", str(tmp_path / "out"), "--preset", "demo", "--device", "cpu"])
