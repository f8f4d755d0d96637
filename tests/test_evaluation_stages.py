"""04's evaluation files, MLflow tracking, 07's study decision against 04's study_pred, and the
report's figures against the metrics files, on one small trained demo."""
from __future__ import annotations

import json
import re
import sqlite3

import numpy as np
import pandas as pd
import pytest

import common
from conftest import load_stage

BINARY_METRICS = ("auc", "sensitivity", "specificity", "ppv", "npv", "f1", "accuracy")  # binary_metrics_with_ci's


@pytest.fixture(scope="module")
def evaluated(trained_run):
    """The session's run of every stage (conftest.trained_run: 04 and 05 with --mlflow, then 08)."""
    return trained_run.out


def test_operating_points_calibration_and_subgroups(evaluated):
    fracture = evaluated / "fracture"
    points = pd.read_csv(fracture / "operating_points.csv")
    assert {"cascade_true", "cascade_pred", "study_pred"} <= set(points["scope"])
    assert set(points["rule"]) == {"youden", "sens90", "sens95"}
    for name in BINARY_METRICS:
        defined = points.dropna(subset=[name, f"{name}_lo"])
        assert ((defined[f"{name}_lo"] <= defined[name] + 1e-12) & (defined[name] <= defined[f"{name}_hi"] + 1e-12)).all()
    train_val = pd.concat([common.read_split(evaluated, "wrist", s) for s in ("train", "val")])
    assert points["prevalence"].unique().tolist() == pytest.approx([train_val["label"].mean()])
    calibration = json.loads((fracture / "calibration.json").read_text())
    assert {"raw", "calibrated", "raw_at_prevalence", "calibrated_at_prevalence"} <= set(calibration["cascade_pred"])
    assert set(calibration["cascade_pred"]["raw"]) == {"brier", "ece"}
    subgroups = pd.read_csv(fracture / "subgroups.csv")
    assert set(subgroups["subgroup"]) == {"projection", "age_group", "sex", "cast", "initial_exam", "laterality"}
    assert {"n", "n_pos", "auc", "auc_lo", "auc_hi", "sensitivity", "specificity"} <= set(subgroups.columns)
    assert (fracture / "reliability.png").stat().st_size > 0
    boneage = json.loads((evaluated / "boneage" / "metrics.json").read_text())["test"]
    for name in ("mae", "rmse", "r2", "bias"):
        assert boneage[f"{name}_lo"] <= boneage[name] <= boneage[f"{name}_hi"]
    assert set(boneage["by_sex"]) <= {"F", "M"} and boneage["by_age_band"]


def test_mlflow_tracks_params_epochs_metrics_plots_and_model_under_out(evaluated):
    database = evaluated / "mlruns" / "mlflow.db"
    with sqlite3.connect(database) as connection:
        experiments = dict(connection.execute("select name, experiment_id from experiments"))
        assert {"wrist-fracture", "boneage"} <= set(experiments)
        run_id = connection.execute("select run_uuid from runs where experiment_id = ?",
                                    (experiments["wrist-fracture"],)).fetchone()[0]
        params = dict(connection.execute("select key, value from params where run_uuid = ?", (run_id,)))
        steps = connection.execute("select count(distinct step) from metrics where run_uuid = ? and key like "
                                   "'%train_loss'", (run_id,)).fetchone()[0]
        final = [k for (k,) in connection.execute("select key from latest_metrics where run_uuid = ?", (run_id,))]
    assert params["epochs"] == "1" and steps >= 1 and any(k.endswith("test_auc") for k in final)
    artifacts = [p.relative_to(evaluated).as_posix() for p in (evaluated / "mlruns" / "artifacts").rglob("*") if p.is_file()]
    assert any(a.endswith("/best.pt") for a in artifacts) and any(a.endswith("/roc.png") for a in artifacts)
    assert any(a.endswith("operating_points.csv") for a in artifacts)


def test_study_pred_is_what_07_decides_for_the_same_images(evaluated, tmp_path):
    test = common.read_split(evaluated, "wrist", "test")
    # No age: 07 routes each image with 03's router, as 04's study_pred did.
    worklist = pd.DataFrame({"path": test["image_path"], "projection": test["projection_name"],
                             "patient_id": test["patient_id"],
                             "study_id": test["patient_id"].astype(str) + "-" + test["study_number"].astype(str),
                             "laterality": test["laterality"]})
    worklist.to_csv(tmp_path / "worklist.csv", index=False)
    table = load_stage("07_predict").main([str(tmp_path / "worklist.csv"), "--models", str(evaluated),
                                           "--out", str(tmp_path / "predicted"), "--device", "cpu"])
    images = table[table["level"] == "image"]
    assert np.allclose(images["fracture_prob"].astype(float), images["fracture_prob"].astype(float).clip(0, 1))
    # The calibration 04 chose on validation is the one 07 applies: the same calibrated probability.
    expected = pd.read_csv(evaluated / "fracture" / "test_predictions.csv", dtype={"filestem": str}).set_index(
        "filestem")["calibrated_prob_route_pred"].dropna()
    got = images.set_index(images["input_path"].map(dict(zip(test["image_path"].astype(str), test["filestem"]))))
    assert len(expected) > 50 and np.allclose(got.loc[expected.index, "fracture_prob"].astype(float), expected,
                                              atol=1e-4)
    assert ((images["raw_prob"] >= 0) & (images["raw_prob"] <= 1)).all()
    predicted = table[table["level"] == "study"].set_index(["study_id", "laterality"])
    studies = pd.read_csv(evaluated / "fracture" / "test_studies.csv", dtype=str)
    keys = list(zip(studies["patient_id"] + "-" + studies["study_id"], studies["laterality"]))
    assert len(keys) > 10
    decided = predicted.loc[keys]
    assert decided["fracture_pred"].astype(int).tolist() == studies["decision"].astype(int).tolist()
    assert decided["n_images"].astype(int).tolist() == studies["n_images"].astype(int).tolist()
    row = pd.read_csv(evaluated / "fracture" / "operating_points.csv").query("scope == 'study_pred' and rule == 'youden'").iloc[0]
    labels, decisions = studies["label"].astype(int).to_numpy(), decided["fracture_pred"].astype(int).to_numpy()
    assert row["n"] == len(studies)
    assert row["sensitivity"] == pytest.approx(decisions[labels == 1].mean())
    assert row["specificity"] == pytest.approx(1 - decisions[labels == 0].mean())


def _cells(report: str, first: str, width: int) -> list[list[str]]:
    """The cells of the report's table rows that start with `first` and have `width` cells."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in report.splitlines()
            if line.startswith(f"| {first} |")]
    return [cells for cells in rows if len(cells) == width]


def _shown(value) -> float:
    """`value` as the report shows it (3 decimals). Python's round on a float: numpy's rounds
    0.3675 via 367.5 to 0.368, while the double closest to 0.3675 lies below it (0.367)."""
    return round(float(value), 3)


def _with_ci(cell: str) -> list[float]:
    return [float(v) for v in re.fullmatch(r"(\S+) \[(\S+), (\S+)\]", cell).groups()]


def test_report_figures_equal_the_metrics_files(evaluated):
    report = (evaluated / "REPORT.md").read_text()
    points = pd.read_csv(evaluated / "fracture" / "operating_points.csv")
    names = ["auc", "sensitivity", "specificity", "ppv", "npv", "f1", "accuracy", "ppv_at_prevalence", "npv_at_prevalence"]
    checked = 0
    for scope in ("cascade_true", "cascade_pred", "study_pred"):
        for cells in _cells(report, scope, 12):
            row = points[(points["scope"] == scope) & (points["rule"] == cells[1])].iloc[0]
            assert cells[2] == f"{int(row['n'])} ({int(row['n_pos'])})"
            for name, cell in zip(names, cells[3:]):
                if cell != "n/a":
                    assert _with_ci(cell) == [_shown(row[name]), _shown(row[f"{name}_lo"]),
                                              _shown(row[f"{name}_hi"])], (scope, cells[1], name)
                    checked += 1
    assert checked >= 60
    assert f"({points['prevalence'].iloc[0]:.3f})" in report
    calibration = json.loads((evaluated / "fracture" / "calibration.json").read_text())
    for scope, values in calibration.items():
        (cells,) = _cells(report, scope, 10)
        assert [float(c) for c in cells[1:9]] == [_shown(values[k + suffix][m]) for suffix in ("", "_at_prevalence")
                                                  for m in ("brier", "ece") for k in ("raw", "calibrated")]
    summary = pd.read_csv(evaluated / "fracture" / "summary.csv")
    cascade = summary[summary["kind"] == "cascade_pred_group"].iloc[0]
    (cells,) = _cells(report, "cascade pred group", 8)
    assert _with_ci(cells[3]) == [_shown(cascade[k]) for k in ("test_auc", "test_auc_ci_low", "test_auc_ci_high")]
    subgroups = pd.read_csv(evaluated / "fracture" / "subgroups.csv", dtype={"value": str})
    no_cast = subgroups[(subgroups["subgroup"] == "cast") & (subgroups["value"] == "0")].iloc[0]
    assert f"without a cast {no_cast['auc']:.3f} [{no_cast['auc_lo']:.3f}, {no_cast['auc_hi']:.3f}]" in report
    assert "--exclude-cast" in report
    boneage = json.loads((evaluated / "boneage" / "metrics.json").read_text())["test"]
    (cells,) = _cells(report, "all", 6)
    for name, cell in zip(("mae", "rmse", "r2", "bias"), cells[2:]):
        assert _with_ci(cell) == [_shown(boneage[name]), _shown(boneage[f"{name}_lo"]),
                                  _shown(boneage[f"{name}_hi"])]


def test_report_headline_sets_the_no_cast_and_initial_exam_aucs_beside_the_overall_one(evaluated):
    """The headline's three AUCs are 04's: cascade_pred's operating point, then its subgroups
    without a cast (cast 0) and of initial exams (initial_exam 1), each with its interval."""
    headline = _section((evaluated / "REPORT.md").read_text(), "Headline: fracture detection as deployed")
    point = pd.read_csv(evaluated / "fracture" / "operating_points.csv").query(
        "scope == 'cascade_pred' and rule == 'youden'").iloc[0]
    subgroups = pd.read_csv(evaluated / "fracture" / "subgroups.csv", dtype={"value": str})
    for name, row in (("every test image", point),
                      ("without a cast", subgroups.query("subgroup == 'cast' and value == '0'").iloc[0]),
                      ("initial exams only", subgroups.query("subgroup == 'initial_exam' and value == '1'").iloc[0])):
        (cells,) = _cells(headline, name, 3)
        assert cells[1] == f"{int(row['n'])} ({int(row['n_pos'])})", name
        assert _with_ci(cells[2]) == [_shown(row[k]) for k in ("auc", "auc_lo", "auc_hi")], name
    assert "overstates" in headline


def _section(report: str, heading: str) -> str:
    """The text of one '## heading' section of REPORT.md, up to the next '## '."""
    return report.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0].strip()


@pytest.mark.parametrize("given, left_out", [("wrist", "boneage"), ("boneage", "wrist")])
def test_report_says_a_track_given_no_data_was_not_run_and_why(small_demo, tmp_path, given, left_out):
    """run_all.py with one track's data: the other track's sections say why they are empty, the
    given track's stages that have not run yet say just that."""
    flag, folder = {"wrist": ("--data", "grazpedwri"), "boneage": ("--boneage-data", "rsna_boneage")}[given]
    load_stage("01_split_test").main([flag, str(small_demo / folder), "--out", str(tmp_path), "--preset", "demo",
                                      "--per-cell", "2"])
    load_stage("08_report").main(["--out", str(tmp_path)])
    report = (tmp_path / "REPORT.md").read_text()
    sections = {"wrist": ["Age-group router (03)", "Fracture models (04)", "Grad-CAM++ (06)"],
                "boneage": ["Bone age (05)"]}
    not_given = {"wrist": "_Not run: no wrist data given (run_all.py --data)._",
                 "boneage": "_Not run: no bone-age data given (run_all.py --boneage-data)._"}
    for heading in sections[left_out]:
        assert _section(report, heading) == not_given[left_out], heading
    for heading in sections[given]:
        assert _section(report, heading) == "_Not run yet._", heading
