#!/usr/bin/env python
"""Test AUC for subtle and for obvious demo fractures separately, per age group and cascaded.

The demo's answer key (grazpedwri/demo_truth.csv, written by make_demo.py) says which fractures
were drawn subtle (a 2-3 px cortical buckle or a faint hairline, no displacement) and which
obvious. Each AUC compares one kind of fracture with ALL normal images of the same scope, so both
read "how well are such fractures told apart from a normal wrist". 95% CIs: patient bootstrap.

Reads   OUT/fracture/test_predictions.csv (04; prob_route_true/prob_route_pred), and, when 04 ran
        with a pooled model, OUT/fracture/ablation_predictions.csv (every arm's probabilities)
        DEMO/grazpedwri/demo_truth.csv
Writes  OUT/fracture/subtle_vs_obvious.csv   arm, scope, kind (subtle|obvious|all), n_pos, n_neg, auc, CI

Run (after run_all.py or 04 on the demo):
  python data/subtle_vs_obvious.py
  python data/subtle_vs_obvious.py --out outputs --demo data/demo
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
import common  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=common.DEFAULT_OUT, help="the pipeline's output folder (default: outputs/)")
    parser.add_argument("--demo", type=Path, default=common.DEMO_WRIST_ROOT.parent, help="make_demo.py's folder (default: data/demo)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for CIs (default: 1000)")
    return parser.parse_args(argv)


def main(argv=None) -> pd.DataFrame:
    args = parse_args(argv)
    truth_path = args.demo / "grazpedwri" / "demo_truth.csv"
    if not truth_path.is_file():
        raise common.InputError(f"{truth_path}: not found; only make_demo.py's demo has an answer key "
                                "(regenerate it with `python data/make_demo.py --force`)")
    truth = pd.read_csv(truth_path, dtype={"filestem": str})
    scored = _arm_columns(args.out / "fracture")
    table = scored["table"].merge(truth[["filestem", "fracture_kind"]], on="filestem", how="left")
    if table["fracture_kind"].isna().any():
        raise common.InputError(f"{truth_path}: {table['fracture_kind'].isna().sum()} test images are not in the "
                                "answer key; this output folder was not made from this demo")
    rows = []
    for arm, (column, route) in scored["arms"].items():
        scopes = [(f"{p}_group{int(g)}", (table["projection_name"] == p) & (table[route] == g))
                  for (p, g), _ in table.dropna(subset=[route]).groupby(["projection_name", route])]
        scopes.append(("all_groups", table["projection_name"].notna()))
        for scope, mask in scopes:
            part = table[mask].dropna(subset=[column])
            for kind in ("subtle", "obvious", "all"):
                chosen = part[(part["fracture_kind"] == "none") | ((part["fracture_kind"] == kind) | (kind == "all"))]
                auc, (low, high) = common.auc_with_ci(chosen["label"], chosen[column], chosen["patient_id"],
                                                      args.bootstrap, 0)
                rows.append({"arm": arm, "scope": scope, "kind": kind, "n_pos": int(chosen["label"].sum()),
                             "n_neg": int((chosen["label"] == 0).sum()), "auc": auc, "auc_lo": low, "auc_hi": high})
    result = pd.DataFrame(rows)
    common.write_csv(result, args.out / "fracture" / "subtle_vs_obvious.csv")
    shown = result.assign(auc_ci=[f"{a:.3f} [{lo:.3f}, {hi:.3f}] (+{n})" for a, lo, hi, n in
                                  zip(result["auc"], result["auc_lo"], result["auc_hi"], result["n_pos"])])
    print(shown.pivot_table(index=["arm", "scope"], columns="kind", values="auc_ci", aggfunc="first")
          .reindex(columns=["subtle", "obvious", "all"]).to_string())
    return result


def _arm_columns(fracture_dir: Path) -> dict:
    """The per-image probabilities to score: every ablation arm if 04 wrote them, else the cascade."""
    ablation = fracture_dir / "ablation_predictions.csv"
    if ablation.is_file():
        table = pd.read_csv(ablation, dtype={"filestem": str})
        arms = {c[:-len("_group")]: (c, "route_group") for c in table  # an arm has a group and a cascade column
                if c.endswith("_group") and f"{c[:-len('_group')]}_cascade_true" in table}
        return {"table": table, "arms": arms}
    path = fracture_dir / "test_predictions.csv"
    if not path.is_file():
        raise common.InputError(f"{path}: not found; run 04_train_fracture_ddp.py first")
    table = pd.read_csv(path, dtype={"filestem": str})
    return {"table": table, "arms": {"deployed": ("prob_route_true", "age_group")}}


if __name__ == "__main__":
    main()
