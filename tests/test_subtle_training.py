"""Issue 14: torchvision's focal loss, timm's weight-decay groups, init weights, 04's pooled start,
ablation, small-group threshold and the resume of fine-tuned runs."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import common
from conftest import ROOT, load_stage
# The small demo's splits (2 test images per cell), shared with the stage tests.
from test_train_stages import _copy_splits as _fresh, split_out as splits  # noqa: F401

fracture_stage = load_stage("04_train_fracture_ddp")


def _old_focal_formula(logits, targets, alpha, gamma):
    """The hand-written focal loss common.py used before torchvision's replaced it (reference)."""
    targets = targets.float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
    p_true = torch.exp(-bce)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * (1 - p_true) ** gamma * bce).mean()


@pytest.mark.parametrize("alpha, gamma", [(0.5, 2.0), (0.25, 2.0), (0.8, 0.0), (0.3, 1.5)])
def test_focal_loss_equals_the_old_formula(alpha, gamma):
    torch.manual_seed(1)
    logits = torch.randn(256) * 3
    targets = (torch.rand(256) > 0.4).float()
    new = common.binary_focal_loss(logits, targets, alpha=alpha, gamma=gamma)
    assert new.item() == pytest.approx(_old_focal_formula(logits, targets, alpha, gamma).item(), rel=1e-5)
    # alpha weights the positives: raising it raises the loss of a batch of hard positives only
    hard_positive = common.binary_focal_loss(torch.tensor([-2.0]), torch.tensor([1.0]), alpha=0.9, gamma=gamma)
    hard_negative = common.binary_focal_loss(torch.tensor([2.0]), torch.tensor([0.0]), alpha=0.9, gamma=gamma)
    assert hard_positive.item() > 8 * hard_negative.item()


def test_focal_loss_negative_alpha_switches_class_weighting_off():
    logits, targets = torch.tensor([-1.0, 1.0, 0.5]), torch.tensor([1.0, 0.0, 1.0])
    unweighted = common.binary_focal_loss(logits, targets, alpha=-1, gamma=2.0)
    # alpha = 0.5 halves every term, so no weighting is exactly twice it
    assert unweighted.item() == pytest.approx(2 * _old_focal_formula(logits, targets, 0.5, 2.0).item(), rel=1e-5)


def _tiny_swin():
    from timm.models.swin_transformer import SwinTransformer
    return SwinTransformer(img_size=32, patch_size=4, in_chans=1, num_classes=1, embed_dim=16,
                           depths=(1, 1), num_heads=(1, 2), window_size=4)


@pytest.mark.parametrize("build", [_tiny_swin, lambda: common.create_model("test_resnet", num_classes=1)])
def test_weight_decay_skips_norms_biases_and_relative_position_tables(build):
    model = build()
    settings = common.TrainSettings(epochs=1, batch_size=2, lr=1e-3, weight_decay=0.05)
    optimizer = common._make_optimizer(model, settings, on_cuda=False)
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    names = dict(model.named_parameters())
    assert set(decay_of) == {id(p) for p in names.values()}  # every parameter is optimised once
    for name, parameter in names.items():
        excluded = (parameter.ndim <= 1 or name.endswith(".bias") or "norm" in name or ".bn" in name
                    or "relative_position_bias_table" in name)
        assert decay_of[id(parameter)] == (0.0 if excluded else 0.05), name
    if "relative_position_bias_table" in " ".join(names):
        tables = [n for n in names if n.endswith("relative_position_bias_table")]
        assert tables and all(names[n].ndim == 2 for n in tables)  # 2-D: the old ndim rule decayed them


def test_weight_decay_exclusions_survive_a_wrapper():
    swin = _tiny_swin()
    wrapper = torch.nn.Sequential()
    wrapper.add_module("backbone", swin)
    names = common.no_weight_decay_names(wrapper)
    assert names and all(n.startswith("backbone.") for n in names)
    assert any("relative_position_bias_table" in n for n in names)


def test_load_init_weights_copies_matching_tensors_and_skips_a_head_of_another_size(tmp_path):
    torch.manual_seed(0)
    source = common.create_model("test_resnet", num_classes=4)
    common.save_checkpoint({"arch": "test_resnet", "state_dict": source.state_dict()}, tmp_path / "best.pt")
    target = common.create_model("test_resnet", num_classes=1)
    common.load_init_weights(target, tmp_path / "best.pt")
    for name, tensor in target.state_dict().items():
        if name.startswith("fc."):
            assert tensor.shape != source.state_dict()[name].shape
        else:
            assert torch.equal(tensor, source.state_dict()[name]), name
    # last.pt keeps its weights under `model`
    common.save_checkpoint({"model": source.state_dict(), "epoch": 1}, tmp_path / "last.pt")
    assert common.load_init_weights(common.create_model("test_resnet", num_classes=4), tmp_path / "last.pt")["epoch"] == 1


def test_load_init_weights_rejects_another_architecture_and_missing_files(tmp_path):
    other = common.create_model("test_convnext", num_classes=1)
    common.save_checkpoint({"arch": "test_convnext", "state_dict": other.state_dict()}, tmp_path / "best.pt")
    with pytest.raises(common.InputError, match="best.pt"):
        common.load_init_weights(common.create_model("test_resnet", num_classes=1), tmp_path / "best.pt")
    with pytest.raises(common.InputError, match="nope.pt"):  # the message names the file
        common.load_init_weights(common.create_model("test_resnet", num_classes=1), tmp_path / "nope.pt")


# ---------------------------------------------------------------- 04: pooled start, ablation, resume

TINY = ["--image-size", "32", "--batch-size", "16", "--device", "cpu", "--bootstrap", "50",
        "--min-epoch-samples", "64"]


def test_group_models_start_from_the_pooled_weights_and_ablation_has_every_arm(splits, small_demo, tmp_path,
                                                                            monkeypatch):
    out, flags = splits
    run_out = _fresh(out, tmp_path / "run")
    starts, real_fit = {}, common.fit

    def recording_fit(model, *args, run_dir, **kwargs):
        starts[str(run_dir.relative_to(run_out / "fracture"))] = {
            k: v.detach().clone() for k, v in model.state_dict().items()}
        return real_fit(model, *args, run_dir=run_dir, **kwargs)

    monkeypatch.setattr(common, "fit", recording_fit)
    load_stage("04_train_fracture_ddp").main([*flags[:4], "--out", str(run_out), "--preset", "demo", *TINY,
                                              "--projections", "AP", "--epochs", "2", "--finetune-epochs", "1",
                                              "--ablation"])
    pooled = torch.load(run_out / "fracture" / "AP" / "pooled" / "best.pt", weights_only=True)["state_dict"]
    summary = pd.read_csv(run_out / "fracture" / "summary.csv")
    trained = summary[(summary["kind"] == "model") & (summary["status"] == "trained")]
    assert len(trained) >= 2 and (summary["kind"] == "pooled").sum() == 1
    for group in trained["age_group"].astype(int):
        fine_tuned, scratch = starts[f"AP/group{group}"], starts[f"ablation/scratch/AP/group{group}"]
        assert all(torch.equal(fine_tuned[k], pooled[k]) for k in pooled), group  # epoch 0 = pooled best.pt
        assert not all(torch.equal(scratch[k], pooled[k]) for k in pooled if k.endswith("weight"))
        meta = torch.load(run_out / "fracture" / "AP" / f"group{group}" / "last.pt", weights_only=True)["meta"]
        assert meta["init"].startswith("pooled:") and meta["settings"]["lr"] == pytest.approx(1e-3)
        assert meta["settings"]["epochs"] == 1  # --finetune-epochs; the pooled model and scratch arm: --epochs
        assert len(pd.read_csv(run_out / "fracture" / "ablation" / "scratch" / "AP" / f"group{group}" / "history.csv")) == 2
    assert len(pd.read_csv(run_out / "fracture" / "AP" / "pooled" / "history.csv")) == 2
    assert set(trained["init"]) == {"pooled"} and trained["threshold_source"].str.len().gt(0).all()
    ablation = pd.read_csv(run_out / "fracture" / "ablation.csv")
    assert list(ablation.columns) == ["arm", "scope", "n", "auc", "auc_lo", "auc_hi"]
    expected_scopes = {f"AP_group{g}" for g in trained["age_group"].astype(int)} | {"cascade_true"}
    assert set(ablation["scope"]) == expected_scopes
    for scope, rows in ablation.groupby("scope"):
        assert sorted(rows["arm"]) == ["conditioned", "deployed", "from_pooled", "mean", "pooled", "scratch"], scope
        assert rows["n"].nunique() == 1 and rows["n"].iloc[0] > 0  # the same test images for every arm
    scored = ablation.dropna(subset=["auc_lo"])
    assert ((scored["auc_lo"] <= scored["auc"]) & (scored["auc"] <= scored["auc_hi"])).all()
    # the main arm's figures are the summary's: same images, same AUC
    for row in trained.itertuples():
        mine = ablation[(ablation["arm"] == "from_pooled") & (ablation["scope"] == f"AP_group{int(row.age_group)}")]
        assert mine["auc"].iloc[0] == pytest.approx(row.test_auc, nan_ok=True)
    # the demo's answer key splits every arm's AUC into subtle and obvious fractures
    kinds = _load_script("subtle_vs_obvious").main(["--out", str(run_out), "--demo", str(small_demo),
                                                    "--bootstrap", "50"])
    assert set(kinds["arm"]) == {"pooled", "conditioned", "scratch", "from_pooled", "mean", "deployed"}
    assert set(kinds["kind"]) == {"subtle", "obvious", "all"}
    every = kinds[kinds["kind"] == "all"].set_index(["arm", "scope"])
    for kind in ("subtle", "obvious"):
        part = kinds[kinds["kind"] == kind].set_index(["arm", "scope"])
        assert (part["n_neg"] == every.loc[part.index, "n_neg"]).all()  # all normals, one kind of fracture
    positives = kinds[kinds["kind"] != "all"].groupby(["arm", "scope"])["n_pos"].sum()
    assert (positives == every.loc[positives.index, "n_pos"]).all()


def _load_script(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, ROOT / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_draws_buckle_fractures_subtle_and_writes_its_answer_key(small_demo):
    demo = _load_script("make_demo")
    table = pd.read_csv(small_demo / "grazpedwri" / "dataset.csv", dtype=str, encoding="utf-8-sig")
    truth = pd.read_csv(small_demo / "grazpedwri" / "demo_truth.csv", dtype={"filestem": str})
    assert list(truth.columns) == ["filestem", "fracture_visible", "fracture_kind"]
    assert list(table.columns) == demo.GRAZ_COLUMNS  # the published 17 columns, nothing added
    merged = table.merge(truth, on="filestem", validate="one_to_one")
    assert len(merged) == len(table)
    visible = merged["fracture_visible_x"] == "1"
    assert (merged.loc[~visible, "fracture_kind"] == "none").all()
    subtle = merged["fracture_kind"] == "subtle"
    assert merged.loc[subtle, "ao_classification"].str.match(r"2[23][ru]?-M/2\.").all()  # torus/buckle codes
    assert 0.15 < subtle[visible].mean() < 0.5  # a realistic share, ~1/3 of fractures
    task = {"ao_code": "23r-M/2.1", "study_number": 1}
    plan = demo.plan_fractures(task, np.full(8, 0.5))["radius"]
    assert plan["subtle"] and plan["angulation"] == 0 and plan["shift"] == (0.0, 0.0) and plan["gap_px"] <= 3
    obvious = demo.plan_fractures({**task, "ao_code": "23r-M/3.1"}, np.full(8, 0.5))["radius"]
    assert not obvious["subtle"] and obvious["gap_px"] >= 6 and abs(obvious["angulation"]) >= 10


def test_small_validation_groups_take_the_pooled_threshold():
    threshold, source = fracture_stage.small_group_threshold([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], 0.37, "pooled model's")
    assert threshold == 0.37 and "pooled model's" in source and "3 positive" in source
    assert fracture_stage.small_group_threshold([1] * 5 + [0] * 5, 0.37, "pooled model's") == (None, "val Youden")
    threshold, source = fracture_stage.small_group_threshold([1, 0], None, "pooled model's")
    assert threshold is None and "UNRELIABLE" in source
    assert "every validation image positive" in fracture_stage.degenerate_warning(
        [0.9, 0.8, 0.7], {"threshold": 0.5, "sensitivity": 0.5, "specificity": 0.5})
    assert "sensitivity 1.00 with specificity 0.00" in fracture_stage.degenerate_warning(
        [0.9, 0.1], {"threshold": 0.5, "sensitivity": 1.0, "specificity": 0.0})
    assert fracture_stage.degenerate_warning([0.9, 0.1], {"threshold": 0.5, "sensitivity": 0.8, "specificity": 0.7}) == ""


def test_small_validation_groups_take_the_pooled_calibration_map():
    pooled_map = {"method": "platt", "slope": 0.7, "intercept": -0.2, "n": 300, "reason": ""}
    assert fracture_stage.small_group_calibration([1] * 11 + [0] * 2, pooled_map) == (pooled_map, "pooled")
    assert fracture_stage.small_group_calibration([1] * 5 + [0] * 5, pooled_map) == (None, "own")
    assert fracture_stage.small_group_calibration([1] * 11 + [0] * 2, None) == (None, "own")


def _deployments(shift: float, n: int = 400) -> tuple[dict, dict, list[dict]]:
    """Four groups' deployed validation probabilities, each the truth's logit moved by `shift`
    (a balanced sampler's prior, say), with the maps fitted on them, as 04 has them before the
    cascade's calibration is chosen."""
    rng = np.random.default_rng(0)
    frames, deployments, rows, val = {"train": pd.DataFrame({"label": rng.integers(0, 2, n)})}, {}, [], []
    for group in range(4):
        truth = rng.uniform(0.05, 0.95, n // 4)
        labels = (rng.uniform(size=n // 4) < truth).astype(int)
        stems = [f"g{group}_{i}" for i in range(n // 4)]
        patients = [f"p{group}_{i // 2}" for i in range(n // 4)]  # two images per patient
        val.append(pd.DataFrame({"filestem": stems, "label": labels, "patient_id": patients}))
        raw = 1 / (1 + np.exp(-(np.log(truth / (1 - truth)) + shift)))
        deployments[("AP", group)] = {"val_probs": pd.Series(raw, index=stems), "calibration_source": "own",
                                      "calibration": fracture_stage.fit_calibration(labels, raw)}
        rows.append({"kind": "model", "projection": "AP", "age_group": group, "calibration_source": "own"})
    frames["val"] = pd.concat(val, ignore_index=True)
    return frames, deployments, rows


def test_the_cascade_calibration_is_chosen_out_of_fold_and_given_to_every_group():
    """One shared shift of every group's probabilities: a map must beat the raw probabilities out
    of fold; a single cascade map (2 parameters), when chosen, is every group's map."""
    frames, deployments, rows = _deployments(shift=2.0)
    choice = fracture_stage.choose_calibration(frames, deployments, rows)
    ece = choice["out_of_fold_ece_at_prevalence"]
    assert set(ece) == {"none", "cascade", "per model"} and choice["n_val"] == 400
    assert choice["deployed"] != "none" and ece[choice["deployed"]] == min(ece.values()) < ece["none"] - 0.05
    maps = [deployment["calibration"] for deployment in deployments.values()]
    if choice["deployed"] == "cascade":
        assert all(m == maps[0] for m in maps) and maps[0]["method"] == "platt"
    assert {row["calibration_source"] for row in rows} == {"own" if choice["deployed"] == "per model" else "cascade"}
    # Already calibrated probabilities: a map worse than none out of fold is never kept.
    frames, deployments, rows = _deployments(shift=0.0)
    choice = fracture_stage.choose_calibration(frames, deployments, rows)
    assert choice["out_of_fold_ece_at_prevalence"][choice["deployed"]] <= choice["out_of_fold_ece_at_prevalence"]["none"]
    # One patient: nothing to cross-validate on, so the per-group maps stay as they are.
    frames, deployments, rows = _deployments(shift=2.0)
    frames["val"]["patient_id"] = "p0"
    before = [deployment["calibration"] for deployment in deployments.values()]
    assert fracture_stage.choose_calibration(frames, deployments, rows) == {}
    assert [deployment["calibration"] for deployment in deployments.values()] == before


def test_a_group_deploys_the_arm_that_wins_on_its_validation_images():
    """The fine-tuned model worse on validation: the pooled model is deployed; better: the
    fine-tuned one; too few normals to tell: the pooled model, whatever the AUCs say."""
    rng = np.random.default_rng(1)
    labels = np.array([1] * 30 + [0] * 30)
    sharp, blurred = labels + rng.normal(0, 0.3, 60), labels + rng.normal(0, 3.0, 60)
    worse = {"pooled": pd.Series(sharp), "from_pooled": pd.Series(blurred), "mean": pd.Series((sharp + blurred) / 2)}
    arm, aucs, reason = fracture_stage.choose_arm(labels, worse)
    assert arm == "pooled" and aucs["pooled"] > aucs["from_pooled"] and reason == "highest validation AUC"
    better = {"pooled": pd.Series(blurred), "from_pooled": pd.Series(sharp), "mean": pd.Series(blurred)}
    assert fracture_stage.choose_arm(labels, better)[0] == "from_pooled"
    few = labels[:34]  # 30 fractures, 4 normals
    arm, _, reason = fracture_stage.choose_arm(few, {name: probs[:34] for name, probs in better.items()})
    assert arm == "pooled" and "4 negative" in reason
    # A tie goes to the simpler arm: one model before the mean of two.
    assert fracture_stage.choose_arm(labels, {"mean": pd.Series(sharp), "from_pooled": pd.Series(sharp)})[0] == "from_pooled"


RESUME = [*TINY, "--preset", "demo", "--projections", "Lat", "--groups", "2", "--epochs", "3", "--patience", "10"]


def test_fine_tuned_model_resumes_and_a_changed_start_does_not(splits, tmp_path, capsys):
    """A fine-tuned group crashes after epoch 1 (a process of its own: the crash is os._exit), then
    resumes from last.pt; other starting weights do not resume it. (The pooled model's own crash and
    resume: test_distributed.py, on 2 ranks.)"""
    out, flags = splits
    run_out = _fresh(out, tmp_path / "resume")
    group_dir, pooled_dir = run_out / "fracture" / "Lat" / "group2", run_out / "fracture" / "Lat" / "pooled"
    stage = load_stage("04_train_fracture_ddp")
    command = [*flags[:4], "--out", str(run_out), *RESUME]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PIPELINE_CRASH_AFTER_EPOCH": "1",
           "PIPELINE_CRASH_RUN": "Lat/group2"}
    crashed = subprocess.run([sys.executable, "tests/fault_launcher.py", "04_train_fracture_ddp.py", *command],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert crashed.returncode == 17, crashed.stdout[-2000:] + crashed.stderr[-2000:]  # the pooled model ended
    assert len(pd.read_csv(pooled_dir / "history.csv")) == 3
    assert torch.load(group_dir / "last.pt", weights_only=True)["epoch"] == 1
    capsys.readouterr()
    stage.main(command)
    assert f"resuming {group_dir} from last.pt after epoch 1" in capsys.readouterr().out
    assert pd.read_csv(group_dir / "history.csv")["epoch"].tolist() == [1, 2, 3]
    assert (run_out / "fracture" / "ablation.csv").is_file()
    # Other starting weights at the same learning rate (a FILE fine-tunes at --finetune-lr too)
    # must not resume the run fine-tuned from the pooled model.
    changed = torch.load(pooled_dir / "best.pt", weights_only=True)
    changed["state_dict"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in changed["state_dict"].items()}
    common.save_checkpoint(changed, tmp_path / "other_start.pt")
    stage.main([*command, "--init", str(tmp_path / "other_start.pt")])
    assert f"{group_dir / 'last.pt'}: written by other settings; training from scratch" in capsys.readouterr().out
    assert torch.load(group_dir / "last.pt", weights_only=True)["meta"]["init"].startswith("other_start.pt:")
    summary = pd.read_csv(run_out / "fracture" / "summary.csv")
    assert "pooled" not in set(summary["kind"])  # --init FILE trains no pooled model


def test_finetune_epochs_default_to_the_preset_but_never_exceed_epochs():
    stage = load_stage("04_train_fracture_ddp")
    preset = stage.PRESETS["demo"]["finetune_epochs"]
    assert stage.parse_args(["--preset", "demo"]).finetune_epochs == preset
    assert stage.parse_args(["--preset", "demo", "--epochs", "1"]).finetune_epochs == 1  # a smoke test stays one epoch
    assert stage.parse_args(["--preset", "demo", "--epochs", "1", "--finetune-epochs", "3"]).finetune_epochs == 3


def test_init_file_must_exist(splits, tmp_path):
    out, flags = splits
    with pytest.raises(common.InputError, match="--init missing.pt: checkpoint not found"):
        load_stage("04_train_fracture_ddp").main([*flags[:4], "--out", str(_fresh(out, tmp_path / "x")),
                                                  "--init", "missing.pt", "--epochs", "1"])
