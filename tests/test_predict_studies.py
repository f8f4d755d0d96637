"""07's study rule and calibrated probabilities: a study (patient, study, laterality) is positive when
any image passes its own model's threshold; fracture_prob is calibrated, the decision is not changed."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import common
from conftest import load_stage
from test_predict import write_png16

EDGES = [5.0, 10.0, 15.0]
# Lat's threshold 0 passes every image; AP's 0.9 none of a fresh model's (checked below), though
# AP's calibration map lifts them far above 0.9: deciding on the calibrated probability would differ.
MODELS = {"AP": (0.9, {"method": "platt", "slope": 1.0, "intercept": 4.0, "n": 50, "reason": ""}),
          "Lat": (0.0, {"method": "identity", "slope": 1.0, "intercept": 0.0, "n": 50, "reason": ""})}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    for projection, (threshold, calibration) in MODELS.items():
        model = common.create_model("resnet10t", num_classes=1)
        common.save_checkpoint({"kind": "classifier", "task": "fracture", "arch": "resnet10t", "num_classes": 1,
                                "image_size": 32, "projection": projection, "age_group": 1, "age_edges": EDGES,
                                "threshold": threshold, "calibration": calibration,
                                "thresholds": {"youden": threshold}, "state_dict": model.state_dict()},
                               out / "fracture" / projection / "group1" / "best.pt")
    return out


def test_one_positive_image_makes_the_study_positive(models, tmp_path):
    rows = [("ap_left.png", "AP", "L"), ("lat_left.png", "Lat", "L"), ("ap_right.png", "AP", "R")]
    for seed, (name, _, _) in enumerate(rows):
        write_png16(tmp_path / name, seed=seed)
    pd.DataFrame([{"path": name, "projection": projection, "age": 7, "study_id": "S1", "patient_id": "P1",
                   "laterality": side} for name, projection, side in rows]).to_csv(tmp_path / "list.csv", index=False)
    table = load_stage("07_predict").main([str(tmp_path / "list.csv"), "--models", str(models),
                                           "--out", str(tmp_path / "out"), "--device", "cpu"])
    images = table[table["level"] == "image"].set_index("input_path")
    ap = images[images["projection"] == "AP"]
    assert (ap["raw_prob"] < 0.9).all() and (ap["fracture_prob"] > 0.9).all()  # the premise above
    assert images["fracture_pred"].tolist() == [0, 1, 0]  # Lat passes its threshold, AP does not
    for name, projection, _ in rows:
        threshold, calibration = MODELS[projection]
        raw = float(images.loc[name, "raw_prob"])
        assert float(images.loc[name, "fracture_prob"]) == pytest.approx(common.apply_calibration([raw], calibration)[0])
        assert float(images.loc[name, "threshold"]) == pytest.approx(common.apply_calibration([threshold], calibration)[0])
        assert images.loc[name, "fracture_pred"] == int(raw >= threshold)
    assert images.loc["ap_left.png", "fracture_prob"] != pytest.approx(images.loc["ap_left.png", "raw_prob"])
    studies = table[table["level"] == "study"].set_index("laterality")
    assert studies.index.tolist() == ["L", "R"]  # one child's left and right wrists: two studies
    left = studies.loc["L"]
    assert (left["fracture_pred"], left["n_images"], left["projection"]) == (1, 2, "AP+Lat")
    assert left["fracture_prob"] == pytest.approx(images.loc[["ap_left.png", "lat_left.png"], "fracture_prob"].max())
    assert left["raw_prob"] == pytest.approx(images.loc[["ap_left.png", "lat_left.png"], "raw_prob"].max())
    assert studies.loc["R", "fracture_pred"] == 0
    assert "patient_id" not in table.columns and "P1" not in (tmp_path / "out" / "predictions.csv").read_text()
    assert np.isfinite(table["fracture_prob"].astype(float)).all()
