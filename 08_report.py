"""Stage 08: OUT/REPORT.md, one page that explains a run from the files the stages left in OUT.

Every figure is read from a metrics file (nothing is recomputed here), shown with its
patient-bootstrap 95% interval: the splits (02), the age router (03), the fracture models, the
operating points of the decision 07 deploys, calibration and subgroups (04), bone age (05) and the
Grad-CAM++ overlays (06). A section whose stage has not run says so instead of failing, and why
when the run tells: a track given no data (01's test_report.json has no split for it, as after
`run_all.py --data D` alone for bone age) is "Not run: no ... data given", otherwise "Not run
yet". run_all.py runs it last; the commands it ran are read from OUT/manifests/.

Reads   OUT/splits/{split_report.md,test_report.json}, OUT/age/metrics.json, OUT/fracture/{summary.csv,
        operating_points.csv, calibration.json, subgroups.csv}, OUT/boneage/metrics.json,
        OUT/gradcam/index.csv, OUT/manifests/*.json
Writes  OUT/REPORT.md

Run:
  python 08_report.py                      # the report of outputs/
  python 08_report.py --out results/       # of another run
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import pandas as pd

import common

SCOPES_SHOWN = ("cascade_true", "cascade_pred", "study_pred")
TRACK_DATA = {"wrist": "no wrist data given (run_all.py --data)",
              "boneage": "no bone-age data given (run_all.py --boneage-data)"}


def parse_args(argv=None):
    return common.resolve_common_args(common.make_parser(__doc__).parse_args(argv))


def main(argv=None):
    args = parse_args(argv)
    path = write_report(args.out)
    common.log(f"08: wrote {path}")
    return path


def write_report(out: Path) -> Path:
    out = Path(out)
    lines = ["# Pediatric wrist radiograph pipeline: run report", "",
             f"Written {time.strftime('%Y-%m-%d %H:%M')} from the outputs in `{out.name}/`. "
             "Every figure below is read from the files the stages wrote; test metrics use a "
             "patient-exclusive test set, and thresholds and calibration are chosen on validation. "
             "Brackets are patient-bootstrap 95% intervals.", ""]
    lines += _report_headline(out) + _report_splits(out) + _report_age(out) + _report_fracture(out)
    lines += _report_operating_points(out) + _report_calibration(out) + _report_subgroups(out)
    lines += _report_ablation(out)
    lines += _report_boneage(out) + _report_gradcam(out) + _report_commands(out)
    with common.atomic_path(out / "REPORT.md") as tmp:
        tmp.write_text("\n".join(lines))
    return out / "REPORT.md"


def fmt(value, digits: int = 3) -> str:
    """A number as the report shows it ('' when missing), so tests can read it back."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{float(value):.{digits}f}"


def with_ci(record: dict, name: str, low: str | None = None, high: str | None = None) -> str:
    value = record.get(name)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if (low or f"{name}_lo") not in record:  # written before intervals existed
        return fmt(value)
    return f"{fmt(value)} [{fmt(record.get(low or f'{name}_lo'))}, {fmt(record.get(high or f'{name}_hi'))}]"


def _not_run(out: Path, track: str) -> str:
    """Why a track's section is empty: 01 split no data for it (the run was not given its data),
    or its stage is still to run. 01's test_report.json holds null for a track it did not split."""
    report = out / "splits" / "test_report.json"
    splits = common.read_json(report) if report.is_file() else {}
    if track in splits and splits[track] is None:
        return f"_Not run: {TRACK_DATA[track]}._"
    return "_Not run yet._"


def _report_headline(out: Path) -> list[str]:
    """The deployed decision's test AUC three ways, side by side: on every test image, without a
    cast, and on initial exams only (04's cascade_pred operating point and subgroups)."""
    points_path, subgroups_path = out / "fracture" / "operating_points.csv", out / "fracture" / "subgroups.csv"
    if not (points_path.is_file() and subgroups_path.is_file()):
        return []
    points = pd.read_csv(points_path)
    subgroups = pd.read_csv(subgroups_path, dtype={"value": str})
    overall = points[(points["scope"] == "cascade_pred") & (points["rule"] == "youden")].to_dict("records")

    def subgroup(name: str, value: int) -> dict:
        rows = subgroups[(subgroups["subgroup"] == name) & (pd.to_numeric(subgroups["value"], errors="coerce") == value)]
        return rows.iloc[0].to_dict() if len(rows) else {}

    shown = [("every test image", overall[0] if overall else {}), ("without a cast", subgroup("cast", 0)),
             ("initial exams only", subgroup("initial_exam", 1))]
    return ["## Headline: fracture detection as deployed", "",
            "Test AUC of the decision 07 deploys (each image routed by 03's predicted age group to its "
            "projection's model, `cascade_pred`):", "",
            "| test images | n (fracture) | AUC [95% CI] |", "|---|---|---|",
            *[f"| {name} | {int(row['n'])} ({int(row['n_pos'])}) | {with_ci(row, 'auc')} |" if row
              else f"| {name} | 0 | n/a |" for name, row in shown], "",
            "A cast, or the healing bone of a follow-up exam, shows that a fracture was already found: an "
            "AUC without casts or on initial exams well below the overall one means the models lean on "
            "those signs, and the overall figure overstates how well they find a new fracture.", ""]


def _report_splits(out: Path) -> list[str]:
    report = out / "splits" / "split_report.md"
    if not report.is_file():
        return ["## Data and splits", "", "_Not run yet (01/02)._", ""]
    body = report.read_text().strip().splitlines()
    # Demote the split report's headings by one level so they nest under this section.
    body = [("#" + line) if line.startswith("#") else line for line in body]
    return ["## Data and splits", "", *body, ""]


def _report_age(out: Path) -> list[str]:
    path = out / "age" / "metrics.json"
    if not path.is_file():
        return ["## Age-group router (03)", "", _not_run(out, "wrist"), ""]
    metrics = common.read_json(path)
    test, val = metrics["test"], metrics.get("val", {})
    return ["## Age-group router (03)", "",
            f"Groups: {', '.join(metrics.get('group_names', []))}.", "",
            "| split | n | accuracy | macro F1 |", "|---|---|---|---|",
            *[f"| {split} | {m.get('n', '')} | {with_ci(m, 'accuracy')} | {with_ci(m, 'macro_f1')} |"
              for split, m in (("test", test), ("val", val)) if m],
            "", "![age router confusion matrix](age/confusion.png) ![training curves](age/curves.png)", ""]


def _report_fracture(out: Path) -> list[str]:
    path = out / "fracture" / "summary.csv"
    if not path.is_file():
        return ["## Fracture models (04)", "", _not_run(out, "wrist"), ""]
    summary = pd.read_csv(path)
    lines = ["## Fracture models (04)", "",
             "Test AUC, sensitivity and specificity at the threshold chosen on validation (Youden's J).", "",
             "| model | status | n test (fracture) | AUC [95% CI] | sensitivity | specificity | threshold | plots |",
             "|---|---|---|---|---|---|---|---|"]
    for row in summary.to_dict("records"):
        if row["kind"] == "model":
            name = f"{row['projection']} group {int(row['age_group'])}"
            folder = f"fracture/{row['projection']}/group{int(row['age_group'])}"
            plots = (f"[ROC]({folder}/roc.png), [PR]({folder}/pr.png), [curves]({folder}/curves.png), "
                     f"[confusion]({folder}/confusion.png)") if row["status"] == "trained" else ""
        elif row["kind"] in ("pooled", "conditioned"):  # one model of all ages per projection
            name, plots = f"{row['projection']} {row['kind'].replace('conditioned', 'age-conditioned')}", ""
        else:
            name, plots = row["kind"].replace("_", " "), ""
        if row["status"] == "skipped":
            lines.append(f"| {name} | skipped: {row['reason']} | | | | | | |")
            continue
        lines.append(f"| {name} | {row['status']} | {int(row['n_test'])} ({int(row['pos_test'])}) | "
                     f"{with_ci(row, 'test_auc', 'test_auc_ci_low', 'test_auc_ci_high')} | "
                     f"{with_ci(row, 'test_sensitivity')} | {with_ci(row, 'test_specificity')} | "
                     f"{fmt(row.get('test_threshold'))} | {plots} |")
    trained = summary[(summary["kind"] == "model") & (summary["status"] == "trained")]
    pictures = [f"![{r.projection} group {int(r.age_group)} ROC](fracture/{r.projection}/group{int(r.age_group)}/roc.png) "
                f"![PR](fracture/{r.projection}/group{int(r.age_group)}/pr.png) "
                f"![curves](fracture/{r.projection}/group{int(r.age_group)}/curves.png)" for r in trained.itertuples()]
    deployed = [f"- {r['projection']} group {int(r['age_group'])}: **{r['deployed']}** ({r['deployed_reason']}"
                + _validation_aucs(r, summary) + ")"
                for r in summary[summary["kind"] == "model"].to_dict("records") if pd.notna(r.get("deployed"))]
    return lines + ["", "The rows above are each group's own model. What 06 and 07 deploy for a group was "
                    "chosen on its validation images: the pooled model, the age-conditioned model (the "
                    "age as an input: the true age, or the router's expected age where no age is known), "
                    "the group's own model or the mean of the pooled and own models, by validation AUC; "
                    "a group with fewer than 5 validation images of a class, or whose own model was "
                    "skipped, takes the pooled model.", "",
                    *deployed, "",
                    "Cascade rows route every test image to its true (or 03-predicted) age group's "
                    "deployed model and pool the calibrated probabilities (each model's raw scale "
                    "differs); the study row scores a study (patient, study, laterality) by its most "
                    "suspicious image. Per-image probabilities: `fracture/test_predictions.csv`.", "",
                    *pictures, ""]


def _validation_aucs(row: dict, summary: pd.DataFrame) -> str:
    """'; validation AUC pooled 0.830, ...' of a group's candidates; '' when validation could not rank them."""
    aucs = [f"{c.removeprefix('val_auc_')} {fmt(row[c])}" for c in summary if c.startswith("val_auc_") and pd.notna(row[c])]
    return "; validation AUC " + ", ".join(aucs) if aucs else ""


def _report_operating_points(out: Path) -> list[str]:
    path = out / "fracture" / "operating_points.csv"
    if not path.is_file():
        return []
    points = pd.read_csv(path)
    prevalence = points["prevalence"].dropna()
    shown = points[points["scope"].isin(SCOPES_SHOWN)]
    lines = ["### Operating points of the deployed decision", "",
             "Rules: `youden` is the stored threshold 07 applies; `sens90`/`sens95` are the highest "
             "thresholds reaching 90%/95% sensitivity on validation. In cascades each image is decided "
             "at its own model's threshold; a study is positive when any image is (07's rule). The test "
             "set is balanced by design, so PPV/NPV are also given at the fracture prevalence of the "
             f"training + validation data ({fmt(prevalence.iloc[0]) if len(prevalence) else 'n/a'}).", "",
             "| scope | rule | n (fracture) | AUC | sensitivity | specificity | PPV | NPV | F1 | accuracy | "
             "PPV at prevalence | NPV at prevalence |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in shown.to_dict("records"):
        lines.append(f"| {row['scope']} | {row['rule']} | {int(row['n'])} ({int(row['n_pos'])}) | "
                     + " | ".join(with_ci(row, name) for name in ("auc", "sensitivity", "specificity",
                                  "ppv", "npv", "f1", "accuracy", "ppv_at_prevalence", "npv_at_prevalence"))
                     + " |")
    notes = points.loc[points["scope"] == "study_pred", "note"].dropna() if "note" in points else []
    return lines + ["", *(f"Studies: {notes.iloc[0]}." for _ in [0] if len(notes)),
                    "Every model's own rows: `fracture/operating_points.csv`.", ""]


def _report_calibration(out: Path) -> list[str]:
    path = out / "fracture" / "calibration.json"
    if not path.is_file():
        return []
    calibration = common.read_json(path)
    prevalence = next(iter(calibration.values())).get("prevalence")
    lines = ["### Calibration", "",
             "Platt scaling fitted per model on validation predictions only (the balanced sampler and "
             "focal loss skew raw probabilities); 07 reports the calibrated `fracture_prob` and keeps "
             "`raw_prob`. Decisions are unchanged. Scores on the test set as it is (balanced by design), "
             "then reweighted to the fracture prevalence of the training + validation data, which "
             "the validation set (and so the map) represents "
             f"({fmt(prevalence)}): a map that is right for the source data looks worse on a balanced set.", "",
             "| scope | Brier raw | Brier calibrated | ECE raw | ECE calibrated | Brier raw at prevalence | "
             "Brier calibrated at prevalence | ECE raw at prevalence | ECE calibrated at prevalence | map |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    choice_path = out / "fracture" / "calibration_choice.json"
    choice = common.read_json(choice_path) if choice_path.is_file() else {}
    if choice:
        lines[3:3] = [f"Deployed map: **{choice['deployed']}**, chosen on validation by the ECE at the source "
                      "prevalence out of fold (patient-grouped cross-validation): "
                      + ", ".join(f"{name} {fmt(ece)}" for name, ece in choice["out_of_fold_ece_at_prevalence"].items())
                      + ". `per model`: each group's own Platt map (a group with < 5 validation images of a "
                      "class takes the pooled model's); `cascade`: one map on the cascade's probabilities; "
                      "`none`: the raw probabilities.", ""]
    for scope, values in calibration.items():
        lines.append(f"| {scope} | " + " | ".join(
            fmt(values[kind][score]) for suffix in ("", "_at_prevalence") for score in ("brier", "ece")
            for kind in (f"raw{suffix}", f"calibrated{suffix}")) + f" | {values.get('method', '')} |")
    return lines + ["", "![reliability diagram](fracture/reliability.png)", ""]


def _report_subgroups(out: Path) -> list[str]:
    path = out / "fracture" / "subgroups.csv"
    if not path.is_file():
        return []
    subgroups = pd.read_csv(path, dtype={"value": str})
    points = pd.read_csv(out / "fracture" / "operating_points.csv")
    overall = points[(points["scope"] == "cascade_pred") & (points["rule"] == "youden")].to_dict("records")
    no_cast = subgroups[(subgroups["subgroup"] == "cast") & (subgroups["value"].isin(["0", "0.0"]))].to_dict("records")
    lines = ["### Subgroups (cascade_pred, youden rule)", ""]
    if overall and no_cast:
        lines += [f"AUC overall {with_ci(overall[0], 'auc')}; without a cast {with_ci(no_cast[0], 'auc')}. "
                  "In GRAZPEDWRI-DX 28% of images show a cast and almost all of those are fractures, so a "
                  "model can score well by detecting casts (the headline above sets the two side by side). "
                  "`01_split_test.py --exclude-cast` leaves cast images out of every split to train and "
                  "test without that shortcut.", ""]
    lines += ["| subgroup | value | n (fracture) | AUC | sensitivity | specificity |", "|---|---|---|---|---|---|"]
    for row in subgroups.to_dict("records"):
        lines.append(f"| {row['subgroup']} | {row['value']} | {int(row['n'])} ({int(row['n_pos'])}) | "
                     f"{with_ci(row, 'auc')} | {with_ci(row, 'sensitivity')} | {with_ci(row, 'specificity')} |")
    return lines + [""]


def _report_ablation(out: Path) -> list[str]:
    """04's ablation.csv: do per-group models earn their keep over the pooled model?"""
    path = out / "fracture" / "ablation.csv"
    if not path.is_file():
        return []
    ablation = pd.read_csv(path)
    arms = [arm for arm in ("pooled", "conditioned", "scratch", "from_pooled", "from_file", "mean", "deployed")
            if arm in set(ablation["arm"])]
    lines = ["### Pooled start against per-group models (ablation)", "",
             "Test AUC on the same images: `pooled` is one model per projection trained on every age "
             "group, `conditioned` one such model per projection that also takes the age (the true age; "
             "in cascade_pred, which knows no age, the router's expected age), "
             "`scratch` per-group models from random weights, `from_pooled` per-group models "
             "fine-tuned from the pooled one, `mean` the mean of the pooled and the group model's "
             "probabilities, `deployed` what 04 chose for each group on its validation images and 07 "
             "deploys (summary.csv: `deployed`). `04_train_fracture_ddp.py --ablation` trains the arm "
             "the run itself did not.", "",
             "| scope | n | " + " | ".join(arms) + " |", "|---|---|" + "---|" * len(arms)]
    for scope, rows in ablation.groupby("scope", sort=False):
        by_arm = {row["arm"]: row for row in rows.to_dict("records")}
        lines.append(f"| {scope} | {int(rows['n'].iloc[0])} | "
                     + " | ".join(with_ci(by_arm[arm], "auc") if arm in by_arm else "" for arm in arms) + " |")
    return lines + [""]


def _report_boneage(out: Path) -> list[str]:
    path = out / "boneage" / "metrics.json"
    if not path.is_file():
        return ["## Bone age (05)", "", _not_run(out, "boneage"), ""]
    test = common.read_json(path)["test"]
    lines = ["## Bone age (05)", "",
             f"Test set of {test['n']} images; predicting the training mean gives MAE "
             f"{fmt(test['baseline_mae'])} months. Bias is predicted - true.", "",
             "| group | n | MAE (months) | RMSE | R^2 | bias |", "|---|---|---|---|---|---|",
             _boneage_row("all", test)]
    for name in ("by_sex", "by_age_band"):
        lines += [_boneage_row(f"{name[3:].replace('_', ' ')} {value}", values)
                  for value, values in test.get(name, {}).items()]
    return lines + ["", "![predicted vs true](boneage/scatter.png) ![Bland-Altman](boneage/bland_altman.png) "
                    "![training curves](boneage/curves.png)", ""]


def _boneage_row(name: str, values: dict) -> str:
    return (f"| {name} | {values['n']} | {with_ci(values, 'mae')} | {with_ci(values, 'rmse')} | "
            f"{with_ci(values, 'r2')} | {with_ci(values, 'bias')} |")


def _report_gradcam(out: Path) -> list[str]:
    path = out / "gradcam" / "index.csv"
    if not path.is_file():
        return ["## Grad-CAM++ (06)", "", _not_run(out, "wrist"), ""]
    index = pd.read_csv(path)
    grids = sorted((out / "gradcam").glob("*/*/grid.png"))
    return ["## Grad-CAM++ (06)", "",
            f"{len(index)} overlays (true positives, false positives and false negatives first); "
            "list in `gradcam/index.csv`.", "",
            *[f"![{g.parent.parent.name} {g.parent.name}]({g.relative_to(out).as_posix()})" for g in grids], ""]


def _report_commands(out: Path) -> list[str]:
    manifests = sorted((out / "manifests").glob("*.json"))
    commands = [common.read_json(m).get("command", "") for m in manifests]
    return ["## Reproduce", "", "Commands run, in order:", "", "```",
            *(commands or ["(not recorded: run_all.py writes OUT/manifests/)"]), "```", "",
            "Library versions: " + ", ".join(f"{k} {v}" for k, v in common.library_versions().items()), ""]


if __name__ == "__main__":
    main()
