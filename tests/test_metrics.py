"""The shared metric functions (common.py section 8): values match scikit-learn, intervals contain
their estimate and narrow with more patients, thresholds and calibration come from validation only,
and the study rule."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import (accuracy_score, brier_score_loss, f1_score, precision_score,
                             recall_score, roc_auc_score)

import common
from conftest import load_stage

BINARY_METRICS = ("auc", "sensitivity", "specificity", "ppv", "npv", "f1", "accuracy")  # binary_metrics_with_ci's

fracture_stage = load_stage("04_train_fracture_ddp")
age_stage = load_stage("03_train_age")


def scores(n_patients: int, seed: int = 0, shift: float = 1.0):
    """Two images per patient, correlated within a patient, with some signal."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(rng.integers(0, 2, n_patients), 2)
    patients = np.repeat(np.arange(n_patients), 2)
    logits = shift * (labels - 0.5) * 2 + np.repeat(rng.normal(0, 1, n_patients), 2) + rng.normal(0, 0.7, 2 * n_patients)
    return labels, 1 / (1 + np.exp(-logits)), patients


def test_binary_metrics_match_scikit_learn():
    labels, probs, patients = scores(150)
    result = common.binary_metrics_with_ci(labels, probs, patients, 0.55, n_boot=50, prevalence=0.3)
    predicted = (probs >= 0.55).astype(int)
    expected = {"auc": roc_auc_score(labels, probs), "sensitivity": recall_score(labels, predicted),
                "specificity": recall_score(labels, predicted, pos_label=0),
                "ppv": precision_score(labels, predicted), "npv": precision_score(labels, predicted, pos_label=0),
                "f1": f1_score(labels, predicted), "accuracy": accuracy_score(labels, predicted)}
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, abs=1e-12), name
    assert (result["n"], result["n_pos"], result["threshold"]) == (300, int(labels.sum()), 0.55)
    sens, spec = expected["sensitivity"], expected["specificity"]
    assert result["ppv_at_prevalence"] == pytest.approx(sens * 0.3 / (sens * 0.3 + (1 - spec) * 0.7))
    assert result["npv_at_prevalence"] == pytest.approx(spec * 0.7 / (spec * 0.7 + (1 - sens) * 0.3))
    tied = np.round(probs, 1)  # ties: the rank AUC must still equal sklearn's
    assert common.binary_metrics_with_ci(labels, tied, patients, 0.5, n_boot=10)["auc"] == pytest.approx(
        roc_auc_score(labels, tied), abs=1e-12)
    assert common.calibration_metrics(labels, probs)["brier"] == pytest.approx(brier_score_loss(labels, probs))


def test_every_bootstrap_resample_equals_scikit_learn_on_its_rows():
    """The bootstrap scores all resamples at once from patient counts (weights); each resample's
    values must equal scikit-learn's on the rows that resample repeats, ties and repeats included."""
    from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score
    labels, probs, patients = scores(60, seed=5)
    probs = np.round(probs, 1)  # many ties
    classes_true, classes_pred = labels + (probs > 0.7), (probs * 3).astype(int)  # 3-4 classes
    months = np.linspace(10, 200, len(labels))
    estimate = months + probs * 40 - 15
    weights = next(common.patient_resample_counts(patients, n_boot=25, seed=7))
    assert weights.shape == (25, len(labels))
    binary = common._decision_metrics(weights, labels, probs, probs >= 0.5, prevalence=None)
    statistics = {"regression": common._regression_statistics(months, estimate)(weights),
                  "classification": age_stage._classification_statistics(classes_true, classes_pred)(weights)}
    for b, counts in enumerate(weights.astype(int)):
        rows = np.repeat(np.arange(len(labels)), counts)
        y, p = labels[rows], probs[rows]
        predicted = (p >= 0.5).astype(int)
        expected = {"auc": roc_auc_score(y, p) if len(np.unique(y)) == 2 else np.nan,
                    "sensitivity": recall_score(y, predicted, zero_division=np.nan),
                    "specificity": recall_score(y, predicted, pos_label=0, zero_division=np.nan),
                    "ppv": precision_score(y, predicted, zero_division=np.nan),
                    "npv": precision_score(y, predicted, pos_label=0, zero_division=np.nan),
                    "f1": f1_score(y, predicted), "accuracy": accuracy_score(y, predicted)}
        for name, value in expected.items():
            assert binary[name][b] == pytest.approx(value, abs=1e-12, nan_ok=True), (b, name)
        regression = statistics["regression"]
        assert regression["mae"][b] == pytest.approx(mean_absolute_error(months[rows], estimate[rows]))
        assert regression["rmse"][b] == pytest.approx(np.sqrt(mean_squared_error(months[rows], estimate[rows])))
        assert regression["r2"][b] == pytest.approx(r2_score(months[rows], estimate[rows]))
        assert regression["bias"][b] == pytest.approx(np.mean(estimate[rows] - months[rows]))
        classification = statistics["classification"]
        every_class = np.unique(np.concatenate([classes_true, classes_pred]))
        assert classification["accuracy"][b] == pytest.approx(accuracy_score(classes_true[rows], classes_pred[rows]))
        assert classification["macro_f1"][b] == pytest.approx(f1_score(
            classes_true[rows], classes_pred[rows], labels=every_class, average="macro", zero_division=0))


def test_intervals_contain_the_estimate_and_narrow_with_more_patients():
    widths = {}
    for n_patients in (40, 400):
        labels, probs, patients = scores(n_patients, seed=n_patients)
        result = common.binary_metrics_with_ci(labels, probs, patients, 0.5, n_boot=300, prevalence=0.3)
        for name in (*BINARY_METRICS, "ppv_at_prevalence", "npv_at_prevalence"):
            assert result[f"{name}_lo"] <= result[name] <= result[f"{name}_hi"], (n_patients, name)
            widths.setdefault(name, []).append(result[f"{name}_hi"] - result[f"{name}_lo"])
        true = np.linspace(0, 200, len(labels))
        regression = common.regression_metrics_with_ci(true, true + probs * 30 - 10, patients, n_boot=300)
        classes = age_stage.classification_metrics_with_ci(labels, (probs >= 0.5).astype(int), patients, n_boot=300)
        for kind, values, names in (("regression", regression, ("mae", "rmse", "r2", "bias")),
                                    ("classes", classes, ("accuracy", "macro_f1"))):
            for name in names:
                assert values[f"{name}_lo"] <= values[name] <= values[f"{name}_hi"], (n_patients, name)
                widths.setdefault(f"{kind} {name}", []).append(values[f"{name}_hi"] - values[f"{name}_lo"])
    for name, (small, large) in widths.items():
        assert large < small, (name, small, large)


def test_bootstrap_resamples_patients_not_images():
    """One patient's 10 identical images: resampling images would make the interval near zero wide."""
    labels = np.repeat([0, 1] * 10, 10)
    patients = np.repeat(np.arange(20), 10)
    probs = np.where(labels == 1, 0.9, 0.1)
    decisions = np.repeat(np.random.default_rng(0).integers(0, 2, 20), 10)  # per-patient decisions
    result = common.binary_metrics_with_ci(labels, probs, patients, 0.5, n_boot=300, decisions=decisions)
    assert result["accuracy_hi"] - result["accuracy_lo"] > 0.25


def test_sensitivity_thresholds_are_the_highest_reaching_the_target():
    labels, probs, _ = scores(200, seed=3)
    for target in (0.9, 0.95):
        threshold = fracture_stage.sensitivity_threshold(labels, probs, target)
        assert np.mean(probs[labels == 1] >= threshold) >= target
        higher = probs[probs > threshold].min()
        assert np.mean(probs[labels == 1] >= higher) < target
    rules = fracture_stage.operating_thresholds(labels, probs)
    assert rules["youden"] == fracture_stage.youden_threshold(labels, probs)
    assert rules["sens95"] <= rules["sens90"]


def test_platt_calibration_fixes_a_prior_shift_and_keeps_every_decision():
    labels, probs, _ = scores(2000, seed=5)
    skewed = 1 / (1 + np.exp(-(np.log(probs / (1 - probs)) + 1.5)))  # as a balanced sampler would
    calibration = fracture_stage.fit_calibration(labels, skewed)
    calibrated = common.apply_calibration(skewed, calibration)
    assert calibration["method"] == "platt" and calibration["slope"] > 0
    assert common.calibration_metrics(labels, calibrated)["ece"] < common.calibration_metrics(labels, skewed)["ece"] / 2
    threshold = 0.6
    mapped = common.apply_calibration([threshold], calibration)[0]
    assert np.array_equal(skewed >= threshold, calibrated >= mapped)
    backwards = fracture_stage.fit_calibration(labels, 1 - skewed)
    assert backwards["method"] == "identity" and "slope" in backwards["reason"]
    assert np.array_equal(common.apply_calibration(skewed, backwards), skewed)


def test_04_fits_thresholds_and_calibration_without_test_data(tmp_path):
    """Changing every test label changes no stored threshold or calibration parameter."""
    stage = load_stage("04_train_fracture_ddp")
    labels, probs, patients = scores(60, seed=7)
    val = pd.DataFrame({"label": labels[:60], "patient_id": patients[:60]})
    test = pd.DataFrame({"label": labels[60:], "patient_id": patients[60:]})
    args = argparse.Namespace(bootstrap=50, seed=0)
    stored = []
    for test_labels in (test["label"], 1 - test["label"]):
        run_dir = tmp_path / f"run{len(stored)}"
        run_dir.mkdir()
        common.save_checkpoint({"kind": "classifier", "state_dict": {"w": torch.zeros(1)}}, run_dir / "best.pt")
        pd.DataFrame({"epoch": [1, 2], "train_loss": [0.5, 0.4], "val_auc": [0.6, 0.7]}).to_csv(
            run_dir / "history.csv", index=False)
        parts = {"val": val, "test": test.assign(label=test_labels)}
        stage._evaluate_and_save(run_dir, "AP group 1", parts, probs[:60], probs[60:], args)
        checkpoint = torch.load(run_dir / "best.pt", weights_only=True)
        stored.append({key: checkpoint[key] for key in ("threshold", "thresholds", "calibration")})
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["calibration"] == checkpoint["calibration"]
        for name in ("roc.png", "pr.png", "curves.png"):
            assert (run_dir / name).stat().st_size > 0
    assert stored[0] == stored[1]
    assert stored[0]["thresholds"]["youden"] == stored[0]["threshold"]


def test_study_rule_any_positive_image_and_left_right_apart():
    images = pd.DataFrame({
        "patient_id": [7, 7, 7, 8], "study_id": [1, 1, 1, 1], "laterality": ["L", "L", "R", "L"],
        "projection": ["AP", "Lat", "AP", "AP"],
        "prob": [0.40, 0.30, 0.20, 0.10], "threshold": [0.50, 0.25, 0.50, 0.50], "label": [1, 0, 0, 0]})
    images["decision"] = (images["prob"] >= images["threshold"]).astype(int)  # AP negative, Lat positive
    studies = common.study_table(images, "prob", "decision").set_index(["patient_id", "laterality"])
    assert len(studies) == 3  # patient 7's left and right wrists are two studies
    left = studies.loc[("7", "L")]
    assert (left["decision"], left["prob"], left["n_images"], left["label"]) == (1, 0.40, 2, 1)
    assert studies.loc[("7", "R"), "decision"] == 0 and studies.loc[("8", "L"), "decision"] == 0
