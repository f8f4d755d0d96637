"""04's age-conditioned model (issue 22, item 4): one model per projection that takes the age as
an input, as 05 takes sex. It learns from the age, reloads from its checkpoint, is scored with the
true age and, in cascade_pred, with the router's expected age; 07 gives it the same; a group may
deploy it, and a group whose own model was skipped deploys a model of all ages."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

import common
from conftest import load_stage
from test_training_behaviour import CPU, SIZE, crack_images, image_sets

fracture_stage = load_stage("04_train_fracture_ddp")


def test_the_conditioned_model_takes_the_age_reloads_and_explains_at_that_age(tmp_path):
    """Its output moves with the age; load_trained_model rebuilds it from best.pt (side_input);
    Grad-CAM++ holds the age fixed and reproduces the probability at that age."""
    common.seed_everything(0)
    model = common.build_side_input_model("test_resnet", "age", image_size=SIZE).eval()
    with torch.no_grad():
        model.age_embedding[0].weight.mul_(50)  # a visible age effect at random init
    images, _ = crack_images(4, seed=0)
    batch = torch.from_numpy(images).unsqueeze(1).float() / 255
    young, old = torch.full((4,), 2.0), torch.full((4,), 16.0)
    with torch.no_grad():
        assert not torch.allclose(model(batch, young), model(batch, old), atol=1e-4)
    common.save_checkpoint({"kind": "classifier", "arch": "test_resnet", "num_classes": 1, "image_size": SIZE,
                            "side_input": "age", "state_dict": model.state_dict()}, tmp_path / "best.pt")
    loaded, _ = common.load_trained_model(tmp_path / "best.pt")
    with torch.no_grad():
        assert torch.equal(loaded(batch, old), model(batch, old))
    ages = np.array([2.0, 6.0, 11.0, 16.0])
    cams, probs = common.grad_cam_plus_plus(loaded, images, torch.device("cpu"), ages)
    squares = common.prepare_images(torch.from_numpy(images).unsqueeze(1), torch.device("cpu"), train=False,
                                    channels_last=False)
    with torch.no_grad():
        expected = torch.sigmoid(loaded(squares, torch.as_tensor(ages, dtype=torch.float32))).numpy()
    assert cams.shape == (4, SIZE, SIZE) and np.isfinite(cams).all()
    assert np.allclose(probs, expected, atol=1e-5)


@pytest.mark.parametrize("arch, size", [("resnet10t", 32), ("test_convnext", 32), ("test_convnextv2", 32),
                                        ("test_swin", 64)])
def test_every_family_builds_a_conditioned_model_ddp_and_grad_cam_can_use(arch, size):
    """Every family 04 offers: each parameter gets a gradient (else DDP's 'Expected to have
    finished reduction'), and Grad-CAM++ finds its last feature map (Swin's NHWC made NCHW)."""
    torch.manual_seed(0)
    model = common.build_side_input_model(arch, "age", image_size=size)
    model(torch.randn(4, 1, size, size), torch.tensor([1.0, 5.0, 9.0, 14.0])).sum().backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    squares = np.random.default_rng(0).integers(0, 255, (2, size, size)).astype(np.uint8)
    cams, probs = common.grad_cam_plus_plus(model, squares, torch.device("cpu"), [3.0, 12.0])
    assert cams.shape == (2, size, size) and np.isfinite(cams).all() and ((0 < probs) & (probs < 1)).all()


def test_the_conditioned_model_learns_what_only_the_age_tells(tmp_path):
    """Labels that only the age predicts (age >= 10), on images that carry no label: trained
    through 04's forward, the model must reach a high validation AUC. A forward that drops the
    age leaves it at chance."""
    rng = np.random.default_rng(0)
    images, _ = crack_images(320, seed=1)
    ages = rng.uniform(0, 19, 320).astype(np.float32)
    labels = (ages >= 10).astype(int)
    train_set, val_set = image_sets(tmp_path, (images[:256], labels[:256]), (images[256:], labels[256:]))
    train_set.values["age"], val_set.values["age"] = ages[:256], ages[256:]
    common.seed_everything(0)
    model = common.build_side_input_model("test_resnet", "age", image_size=SIZE)

    def bce(logits, batch):
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["target"].float())

    def val_auc(trained) -> dict:
        logits = common.predict(trained, val_set, fracture_stage._forward, batch_size=64, info=CPU)
        return {"auc": fracture_stage.binary_metrics(labels[256:], logits, 0.0)["auc"]}

    fitted = common.fit(model, train_set, labels[:256], forward=fracture_stage._forward, loss_fn=bce,
                        evaluate=val_auc, info=CPU, run_dir=tmp_path / "run", checkpoint_meta={"kind": "test"},
                        balanced=True, settings=common.TrainSettings(epochs=6, batch_size=32, lr=3e-3, patience=10,
                                                                     seed=0))
    assert fitted["best"]["auc"] > 0.9 and val_auc(model)["auc"] > 0.9


def test_a_group_may_deploy_the_conditioned_model_and_a_small_group_a_model_of_all_ages():
    rng = np.random.default_rng(2)
    labels = np.array([1] * 30 + [0] * 30)
    sharp, blurred = labels + rng.normal(0, 0.3, 60), labels + rng.normal(0, 3.0, 60)
    candidates = {"pooled": pd.Series(blurred), "conditioned": pd.Series(sharp), "from_pooled": pd.Series(blurred)}
    assert fracture_stage.choose_arm(labels, candidates)[0] == "conditioned"
    # A tie goes to the simpler arm: the pooled model before the one with an extra input.
    assert fracture_stage.choose_arm(labels, {"conditioned": pd.Series(sharp), "pooled": pd.Series(sharp)})[0] == "pooled"
    few = labels[:33]  # 3 normals: without a pooled model (--init scratch) the conditioned one
    arm, _, reason = fracture_stage.choose_arm(few, {"scratch": pd.Series(sharp[:33]),
                                                     "conditioned": pd.Series(blurred[:33])})
    assert arm == "conditioned" and "3 negative" in reason


def test_04_scores_the_conditioned_model_with_the_true_age_and_cascade_pred_with_the_expected_age(trained_run):
    """The conditioned best.pt stores each group's mean training age; its probabilities in the
    group rows are at the true age, in cascade_pred at the router's expected age (03's group
    probabilities x those means), recomputed here from the files alone."""
    out = trained_run.out
    summary = pd.read_csv(out / "fracture" / "summary.csv")
    assert (summary["kind"] == "conditioned").sum() == 2  # AP and Lat
    train = common.read_split(out, "wrist", "train")
    model, checkpoint = common.load_trained_model(out / "fracture" / "AP" / "conditioned" / "best.pt")
    means = train.groupby("age_group")["age"].mean()
    assert checkpoint["side_input"] == "age"
    assert checkpoint["group_mean_age"] == pytest.approx(means.reindex(range(len(means))).tolist())
    table = pd.read_csv(out / "fracture" / "ablation_predictions.csv", dtype={"filestem": str})
    assert {"conditioned_group", "conditioned_cascade_pred"} <= set(table.columns)
    ablation = pd.read_csv(out / "fracture" / "ablation.csv")
    for cascade in ("cascade_true", "cascade_pred"):  # both routes, every arm on the same images
        rows = ablation[ablation["scope"] == cascade]
        assert {"pooled", "conditioned", "from_pooled", "mean", "deployed"} <= set(rows["arm"]) and rows["n"].nunique() == 1
    routed = pd.read_csv(out / "age" / "predictions.csv", dtype={"filestem": str}).set_index("filestem")
    test = common.read_split(out, "wrist", "test").set_index("filestem")
    chosen = table[(table["projection_name"] == "AP")].dropna(subset=["conditioned_group"]).head(12)["filestem"]
    probs = routed.loc[chosen, [f"prob_group{g}" for g in range(len(means))]].to_numpy(float)
    expected_age = probs @ np.asarray(checkpoint["group_mean_age"])
    squares = np.stack([common.preprocess_image(test.at[stem, "image_path"], checkpoint["image_size"])[0]
                        for stem in chosen])
    images = common.prepare_images(torch.from_numpy(squares).unsqueeze(1), torch.device("cpu"), train=False,
                                   channels_last=True)
    with torch.no_grad():
        at_true = torch.sigmoid(model(images, torch.tensor(test.loc[chosen, "age"].to_numpy(np.float32)))).numpy()
        at_expected = torch.sigmoid(model(images, torch.tensor(expected_age, dtype=torch.float32))).numpy()
    by_stem = table.set_index("filestem").loc[chosen]
    assert np.allclose(by_stem["conditioned_group"], at_true, atol=1e-5)
    assert np.allclose(by_stem["conditioned_cascade_pred"], at_expected, atol=1e-5)
    assert np.allclose(by_stem["conditioned_cascade_true"], at_true, atol=1e-5)
    assert not np.allclose(at_true, at_expected, atol=1e-6)  # the two ages differ, and so do the inputs


def _deploy_conditioned_everywhere(out) -> None:
    """Rewrite every deployed.json of a copied run to the projection's conditioned model."""
    for path in (out / "fracture").glob("*/group*/deployed.json"):
        record = json.loads(path.read_text())
        record.update(arm="conditioned", models=[f"{path.parent.parent.name}/conditioned/best.pt"])
        path.write_text(json.dumps(record))


def test_07_gives_a_deployed_conditioned_model_the_given_age_or_the_routers_expected_age(trained_run, tmp_path):
    out = trained_run.copy_to(tmp_path / "run")
    _deploy_conditioned_everywhere(out)
    test = common.read_split(out, "wrist", "test")
    worklist = pd.DataFrame({"path": test["image_path"], "projection": test["projection_name"]})
    predict = load_stage("07_predict")
    flags = ["--models", str(out), "--device", "cpu"]
    expected = pd.read_csv(out / "fracture" / "ablation_predictions.csv", dtype={"filestem": str}).set_index("filestem")
    stems = dict(zip(test["image_path"].astype(str), test["filestem"]))
    for with_age, column, source in ((False, "conditioned_cascade_pred", "predicted"), (True, "conditioned_group", "given")):
        given = worklist.assign(age=test["age"]) if with_age else worklist
        given.to_csv(tmp_path / "worklist.csv", index=False)
        table = predict.main([str(tmp_path / "worklist.csv"), "--out", str(tmp_path / column), "--cam", *flags])
        images = table[table["level"] == "image"].set_index(table["input_path"].map(stems))
        assert images["model"].str.endswith("conditioned/best.pt").all() and len(images) > 50
        assert (images["age_group_source"] == source).all()
        wanted = expected[column].dropna()
        shared = wanted.index.intersection(images.index)
        assert len(shared) > 50
        assert np.allclose(images.loc[shared, "raw_prob"].astype(float), wanted.loc[shared], atol=1e-5), column
        if with_age:
            assert np.allclose(images["model_age"].astype(float), test.set_index("filestem").loc[images.index, "age"],
                               atol=0.01)
        assert images["cam_path"].notna().all()


def test_a_group_whose_own_model_was_skipped_deploys_the_pooled_model(trained_run, tmp_path):
    """The small demo's youngest AP group has no normal to train on: it deploys the pooled model,
    and 07 predicts its images instead of skipping them."""
    out = trained_run.out
    summary = pd.read_csv(out / "fracture" / "summary.csv")
    skipped = summary[(summary["kind"] == "model") & (summary["status"] == "skipped")]
    assert len(skipped)
    for row in skipped.itertuples():
        record = json.loads((out / "fracture" / row.projection / f"group{int(row.age_group)}" / "deployed.json")
                            .read_text())
        assert record["arm"] == "pooled" and record["models"] == [f"{row.projection}/pooled/best.pt"]
        assert record["reason"].startswith("own model skipped")
        assert row.deployed == "pooled"
        assert f"- {row.projection} group {int(row.age_group)}: **pooled** (own model skipped" in \
            (out / "REPORT.md").read_text()
    row = skipped.iloc[0]
    test = common.read_split(out, "wrist", "test")
    members = test[(test["projection_name"] == row["projection"]) & (test["age_group"] == row["age_group"])]
    worklist = pd.DataFrame({"path": members["image_path"], "projection": members["projection_name"],
                             "age": members["age"]})
    worklist.to_csv(tmp_path / "worklist.csv", index=False)
    table = load_stage("07_predict").main([str(tmp_path / "worklist.csv"), "--models", str(out),
                                           "--out", str(tmp_path / "predicted"), "--device", "cpu"])
    images = table[table["level"] == "image"]
    assert len(images) == len(members) and images["fracture_prob"].notna().all()
    assert (images["model"] == f"fracture/{row['projection']}/pooled/best.pt").all()
