"""What the shared training loop (common.fit) must do, checked on tiny synthetic image sets.

Each test here fails when one behaviour breaks: the model must learn a learnable task; early
stopping must stop at the patience; the weights returned, saved and thresholded must be the best
epoch's, not the last; every batch of the balanced sampler must hold both classes; augmentation
must run in training and nowhere else.
"""
from __future__ import annotations

import ast
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import common
from conftest import ROOT, load_stage

fracture_stage = load_stage("04_train_fracture_ddp")

SIZE = 32
CPU = common.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def crack_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise with one bright 8x8 'bone' each; in the positives a dark line crosses the bone.

    Both classes hold the same bright square, so overall brightness tells them apart only a
    little: an untrained network scores far from the bound (checked below), a trained one at it.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    rng.shuffle(labels)
    images = rng.integers(40, 90, (n, SIZE, SIZE)).astype(np.uint8)
    for image, label in zip(images, labels):
        row, col = rng.integers(6, SIZE - 14, 2)
        image[row:row + 8, col:col + 8] = 220
        if label:
            image[row + 3:row + 5, col:col + 8] = 40
    return images, labels


def image_sets(folder: Path, *parts: tuple[np.ndarray, np.ndarray]) -> list[common.CachedImageDataset]:
    """One CachedImageDataset per (images, labels) part, all rows of one cache array as fit reads it."""
    folder.mkdir(parents=True, exist_ok=True)
    array_path = folder / "images.npy"
    np.save(array_path, np.concatenate([images for images, _ in parts]))
    total = sum(len(labels) for _, labels in parts)
    cache = common.ImageCache(array_path, SIZE, {str(row): row for row in range(total)}, {})
    datasets, first = [], 0
    for images, labels in parts:
        rows = [str(row) for row in range(first, first + len(labels))]
        datasets.append(common.CachedImageDataset(cache, rows, target=labels.astype(np.float32)))
        first += len(labels)
    return datasets


def forward(model, images, batch):
    return model(images).squeeze(1)


def bce(logits, batch):
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["target"].float())


def val_auc(model, dataset, labels) -> float:
    logits = common.predict(model, dataset, forward, batch_size=32, info=CPU)
    return fracture_stage.binary_metrics(labels, 1 / (1 + np.exp(-logits)), 0.5)["auc"]


def new_model():
    common.seed_everything(0)
    return common.create_model("test_resnet", num_classes=1)


def train(model, train_set, labels, evaluate, run_dir: Path, **settings) -> dict:
    defaults = {"epochs": 2, "batch_size": 16, "lr": 3e-3, "patience": 10, "seed": 0}
    return common.fit(model, train_set, labels, forward=forward, loss_fn=bce, evaluate=evaluate,
                      settings=common.TrainSettings(**{**defaults, **settings}), info=CPU,
                      run_dir=run_dir, checkpoint_meta={"kind": "test"}, balanced=True)


class ScriptedValidation:
    """An evaluate() whose AUC follows a fixed script; keeps a copy of the weights it was shown."""

    def __init__(self, aucs):
        self.aucs = list(aucs)
        self.weights: list[dict] = []

    def __call__(self, model) -> dict:
        self.weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {"auc": self.aucs[len(self.weights) - 1]}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def tiny_sets(tmp_path_factory):
    """32 training and 16 validation images: two optimizer steps an epoch, for the scripted tests."""
    train_part, val_part = crack_images(32, seed=1), crack_images(16, seed=2)
    train_set, val_set = image_sets(tmp_path_factory.mktemp("tiny"), train_part, val_part)
    return train_set, train_part[1], val_set, val_part[1]


# ---- learning -----------------------------------------------------------------------------

def test_fit_learns_a_learnable_task(tmp_path):
    train_part, val_part = crack_images(160, seed=0), crack_images(80, seed=100)
    train_set, val_set = image_sets(tmp_path / "images", train_part, val_part)
    model = new_model()
    untrained = val_auc(model.eval(), val_set, val_part[1])
    assert untrained < 0.85, f"the task is too easy to show learning: untrained AUC {untrained:.3f}"
    result = train(model, train_set, train_part[1], lambda m: {"auc": val_auc(m, val_set, val_part[1])},
                   tmp_path / "run", epochs=2)
    trained = val_auc(model, val_set, val_part[1])
    assert result["best"]["auc"] >= 0.95, (untrained, result["history"])
    assert trained == pytest.approx(result["best"]["auc"])  # the model returned is the one scored
    losses = [row["train_loss"] for row in result["history"]]
    assert losses[-1] < 0.5 * losses[0], losses


# ---- early stopping and best weights ----------------------------------------------------------

@pytest.mark.parametrize("patience", [1, 3])
def test_early_stopping_stops_exactly_at_the_patience(tiny_sets, tmp_path, patience):
    train_set, labels, _, _ = tiny_sets
    # Best at epoch 2, then no improvement; the late 0.99s must never be reached.
    script = ScriptedValidation([0.60, 0.80, 0.70, 0.75, 0.79, 0.99, 0.99, 0.99])
    result = train(new_model(), train_set, labels, script, tmp_path, epochs=8, patience=patience)
    stop_epoch = 2 + patience  # the best epoch, then `patience` epochs without improvement
    validated = len(script.weights)
    assert validated == stop_epoch, f"validated {validated} epochs; patience {patience} stops after {stop_epoch}"
    assert [row["epoch"] for row in result["history"]] == list(range(1, stop_epoch + 1))
    assert result["best"] == {"epoch": 2, "auc": 0.80}
    assert len(pd.read_csv(tmp_path / "history.csv")) == stop_epoch
    assert common.load_checkpoint(tmp_path / "last.pt")["epoch"] == stop_epoch


def test_returned_and_saved_weights_are_the_best_epochs(tiny_sets, tmp_path):
    train_set, labels, _, _ = tiny_sets
    script = ScriptedValidation([0.60, 0.90, 0.70, 0.80])  # epoch 2 is best, epoch 4 is last
    model = new_model()
    result = train(model, train_set, labels, script, tmp_path, epochs=4)
    best, last = script.weights[1], script.weights[3]
    assert not same_weights(best, last)  # training moved the weights, so the check below can fail
    assert result["best"]["epoch"] == 2
    assert same_weights(model.state_dict(), best), "fit must return the best epoch's weights"
    saved = common.load_checkpoint(tmp_path / "best.pt")
    assert saved["epoch"] == 2
    assert same_weights(saved["state_dict"], best), "best.pt must hold the best epoch's weights"


def test_fracture_stage_thresholds_and_saves_the_best_epoch(demo_splits, tmp_path, monkeypatch):
    """Stage 04 with a scripted validation AUC: its best.pt, threshold and val metrics all come
    from the best epoch's weights."""
    out = demo_splits.copy_to(tmp_path / "out")
    script = ScriptedValidation([0.60, 0.90, 0.70, 0.80])
    real_fit = common.fit

    def fit_with_script(*args, evaluate, **kwargs):
        return real_fit(*args, evaluate=lambda model: (evaluate(model), script(model))[1], **kwargs)

    monkeypatch.setattr(common, "fit", fit_with_script)
    stage = load_stage("04_train_fracture_ddp")
    stage.main(["--out", str(out), "--preset", "demo", "--device", "cpu", "--init", "scratch", "--no-conditioned",
                "--image-size", str(SIZE),
                "--batch-size", "16", "--projections", "AP", "--groups", "2", "--epochs", "4",
                "--patience", "10", "--min-epoch-samples", "0", "--bootstrap", "20"])
    folder = out / "fracture" / "AP" / "group2"
    checkpoint = common.load_checkpoint(folder / "best.pt")
    best, last = script.weights[1], script.weights[3]
    assert checkpoint["epoch"] == 2 and same_weights(checkpoint["state_dict"], best)

    val = common.read_split(out, "wrist", "val").query("projection_name == 'AP' and age_group == 2")
    frames, cache = common.cache_split_images({"val": val}, SIZE, out, "wrist")
    val_set = common.CachedImageDataset(cache, frames["val"]["image_path"],
                                        target=frames["val"]["label"].to_numpy(np.float32))

    def threshold_and_auc(weights):
        model = common.create_model("test_resnet", num_classes=1)
        model.load_state_dict(weights)
        logits = common.predict(model, val_set, stage._forward, batch_size=16, info=CPU)
        probs = 1 / (1 + np.exp(-logits))
        return (fracture_stage.youden_threshold(frames["val"]["label"], probs),
                fracture_stage.binary_metrics(frames["val"]["label"], probs, 0.5)["auc"])

    best_threshold, best_auc = threshold_and_auc(best)
    last_threshold, _ = threshold_and_auc(last)
    assert best_threshold != pytest.approx(last_threshold)  # so a threshold from the last epoch shows
    assert checkpoint["threshold"] == pytest.approx(best_threshold)
    assert checkpoint["val_metrics"]["auc"] == pytest.approx(best_auc)


# ---- the balanced sampler, batch by batch ------------------------------------------------------

class _LoaderBuilt(Exception):
    pass


def loader_fit_builds(monkeypatch, tmp_path, labels, *, rank: int, world_size: int, batch_size: int,
                      min_epoch_samples: int):
    """The training DataLoader exactly as fit builds it for this rank (fit stops right after)."""
    built = []
    real_make_loader = common.make_loader

    def capture(dataset, **kwargs):
        built.append(real_make_loader(dataset, **kwargs))
        raise _LoaderBuilt

    monkeypatch.setattr(common, "make_loader", capture)
    images = np.zeros((len(labels), 4, 4), dtype=np.uint8)
    (dataset,) = image_sets(tmp_path, (images, labels))
    info = common.DistInfo(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))
    with pytest.raises(_LoaderBuilt):
        common.fit(torch.nn.Linear(1, 1), dataset, labels, forward=forward, loss_fn=bce,
                   evaluate=lambda model: {"auc": 0.5}, info=info, run_dir=tmp_path,
                   settings=common.TrainSettings(epochs=3, batch_size=batch_size, lr=1e-3,
                                                 min_epoch_samples=min_epoch_samples),
                   checkpoint_meta={"kind": "test"}, balanced=True)
    monkeypatch.undo()
    return built[0]


def binomial_bounds(batch: int, alpha: float) -> tuple[int, int]:
    """[low, batch - low]: a fair coin lands outside with probability below alpha."""
    low = 0
    while sum(math.comb(batch, k) for k in range(low + 1)) / 2 ** batch <= alpha / 2:
        low += 1
    return low, batch - low


@pytest.mark.parametrize("world_size", [1, 2])
def test_every_balanced_batch_holds_both_classes(monkeypatch, tmp_path, world_size):
    # A quarter fractures, as in the smaller age groups; cycled up to 04's default 512 draws.
    labels = (np.random.default_rng(0).random(300) < 0.25).astype(int)
    batch_size, epochs = 32, 3
    per_rank_batch = batch_size // world_size
    counts = []
    for rank in range(world_size):
        loader = loader_fit_builds(monkeypatch, tmp_path / f"rank{rank}", labels, rank=rank,
                                   world_size=world_size, batch_size=batch_size, min_epoch_samples=512)
        assert loader.batch_size == per_rank_batch
        for epoch in range(epochs):
            loader.sampler.set_epoch(epoch)
            counts += [(int(batch["target"].sum()), len(batch["target"])) for batch in loader]
    assert {size for _, size in counts} == {per_rank_batch}  # full batches only
    low, high = binomial_bounds(per_rank_batch, alpha=0.01 / len(counts))
    lopsided = [positives for positives, _ in counts if not low <= positives <= high]
    assert not lopsided, f"{len(lopsided)} of {len(counts)} batches outside [{low}, {high}]: {lopsided[:10]}"
    positives = np.array([positives for positives, _ in counts])
    assert positives.mean() == pytest.approx(per_rank_batch / 2, abs=0.5)


# ---- augmentation: in training only ------------------------------------------------------------

def test_prepare_images_augments_only_when_training():
    torch.manual_seed(0)
    images = torch.from_numpy(crack_images(8, seed=3)[0]).unsqueeze(1)
    plain = (images.float() / 255.0 - common.PIXEL_MEAN) / common.PIXEL_STD
    evaluated = common.prepare_images(images, torch.device("cpu"), train=False, channels_last=False)
    trained = common.prepare_images(images, torch.device("cpu"), train=True, channels_last=False)
    assert torch.equal(evaluated, plain)
    assert (trained - plain).abs().amax(dim=(1, 2, 3)).min() > 0.5  # every image changed


def test_fit_augments_while_predict_and_batchnorm_recalibration_do_not(tiny_sets, tmp_path, monkeypatch):
    train_set, labels, val_set, val_labels = tiny_sets
    calls, augmented = [], []
    real_prepare, real_augment = common.prepare_images, common.augment_batch

    def recording_prepare(images, device, *, train, channels_last):
        calls.append((sys._getframe(1).f_code.co_name, train))
        return real_prepare(images, device, train=train, channels_last=channels_last)

    def counting_augment(images):
        augmented.append(len(images))
        return real_augment(images)

    monkeypatch.setattr(common, "prepare_images", recording_prepare)
    monkeypatch.setattr(common, "augment_batch", counting_augment)
    result = train(new_model(), train_set, labels, lambda m: {"auc": val_auc(m, val_set, val_labels)},
                   tmp_path, epochs=1)
    by_caller = {name: {train_flag for caller, train_flag in calls if caller == name}
                 for name, _ in calls}
    assert by_caller == {"_train_epoch": {True}, "recalibrate_batchnorm": {False}, "predict": {False}}
    training_batches = sum(1 for caller, _ in calls if caller == "_train_epoch")
    assert len(augmented) == training_batches == len(train_set) // 16 * result["history"][-1]["epoch"]


def test_no_stage_augments_outside_training():
    """Every prepare_images call in the project passes train=False, except fit's training epoch."""
    training_calls = []
    for path in sorted(ROOT.glob("*.py")):
        tree = ast.parse(path.read_text())
        for function in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
            for call in (n for n in ast.walk(function) if isinstance(n, ast.Call)):
                name = getattr(call.func, "attr", getattr(call.func, "id", None))
                if name != "prepare_images":
                    continue
                flag = next(k.value for k in call.keywords if k.arg == "train")
                assert isinstance(flag, ast.Constant), f"{path.name}:{call.lineno}: train= must be a literal"
                if flag.value is not False:
                    training_calls.append(f"{path.name}:{function.name}")
    assert training_calls == ["common.py:_train_epoch"]


def test_an_edit_to_code_that_lives_in_04_retrains_04(tmp_path, monkeypatch):
    """04's test evaluation and validation choices live in the stage now, not in common.py: an edit
    there must still change the code hash that last.pt resumes by, and run_all's up-to-date check."""
    import importlib.util
    import shutil
    run_all = load_stage("run_all")
    stage = next(s for s in run_all.STAGES if s.name == "04")
    for name in (stage.script, "common.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    monkeypatch.setattr(common, "ROOT", tmp_path)  # where run_all reads the stages' code
    args = type("Args", (), {"out": tmp_path / "outputs", "tracks": ["wrist"], "data": None, "boneage_data": None})

    def fingerprints() -> tuple[str, str]:
        spec = importlib.util.spec_from_file_location("copied_04", tmp_path / stage.script)
        copied = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(copied)
        command = [sys.executable, stage.script, "--out", str(args.out)]
        return common.code_fingerprint(copied._forward), run_all._fingerprint(stage, command, args)

    before = fingerprints()
    assert fingerprints() == before
    source = (tmp_path / stage.script).read_text()
    signature = "def write_ablation(out_dir, test, arm_probs, args, expected_age_probs: dict | None = None) -> None:\n"
    edited = source.replace(signature, signature + "    args = args\n")
    assert edited != source
    (tmp_path / stage.script).write_text(edited)
    after = fingerprints()
    assert after[0] != before[0] and after[1] != before[1]
