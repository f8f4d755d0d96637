"""01's --exclude-cast, --ao-filter and --include-metal, run through 01 -> 02 on the small demo.

A filtered row must be in no split (train, val, test or quarantine), its count must be in the
exclusion report (test_report.json and split_report.md), and without the flag the same rows must
be there. The expected rows are computed here from dataset.csv, independently of the reader.
"""
from __future__ import annotations

import re

import pandas as pd
import pytest

import common
from conftest import load_stage

SPLITS = ("train", "val", "test", "quarantine")


def raw_rows(demo) -> pd.DataFrame:
    frame = pd.read_csv(demo / "grazpedwri" / "dataset.csv", encoding="utf-8-sig", dtype=str)
    for column in ("age", "projection", "cast", "metal"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    frame["ao_classification"] = frame["ao_classification"].fillna("")
    return frame


def split_stems(out) -> set[str]:
    return set().union(*(common.read_split(out, "wrist", split)["filestem"] for split in SPLITS))


def run_splits(demo, out, flags: list[str]):
    data = ["--data", str(demo / "grazpedwri"), "--boneage-data", str(demo / "rsna_boneage"),
            "--out", str(out), "--preset", "demo"]
    load_stage("01_split_test").main([*data, "--per-cell", "2", *flags])
    load_stage("02_split_trainval").main(data)
    return common.read_json(out / "splits" / "test_report.json")["wrist"]["excluded"], \
        (out / "splits" / "split_report.md").read_text()


def not_modelled(raw: pd.DataFrame) -> pd.Series:
    """Rows every run drops before the optional filters: no age, or not an AP/Lat projection."""
    return raw["age"].isna() | ~raw["projection"].isin([1, 2])


def no_code_matches(codes: str, pattern: str) -> bool:
    parts = [code.strip() for code in re.split(r"[;,]", codes) if code.strip()]
    return bool(parts) and not any(re.search(pattern, code) for code in parts)


@pytest.mark.parametrize("flags, reason, rule", [
    (["--exclude-cast"], "cast", lambda raw: raw["cast"] == 1),
    (["--ao-filter", "^23r"], "AO code not matching",
     lambda raw: raw["ao_classification"].map(lambda codes: no_code_matches(codes, "^23r"))),
], ids=["exclude-cast", "ao-filter"])
def test_filter_drops_its_rows_from_every_split_and_counts_them(demo_splits, small_demo, tmp_path,
                                                                flags, reason, rule):
    raw = raw_rows(small_demo)
    hit = rule(raw)
    # Counted under this reason: rows not already dropped by an earlier filter (metal by default).
    counted = hit & ~not_modelled(raw) & ~(raw["metal"] == 1)
    assert counted.sum() > 0, "the demo must hold such rows, or this test cannot fail"
    excluded, report = run_splits(small_demo, tmp_path, flags)
    kept = split_stems(tmp_path)
    leaked = kept & set(raw.loc[hit, "filestem"])
    assert not leaked, f"{len(leaked)} filtered rows are in the splits, e.g. {sorted(leaked)[:3]}"
    assert excluded[reason] == counted.sum()
    assert f"{counted.sum()} {reason}" in report
    # Without the flag (the shared default run) those rows are in the splits, and nothing else differs.
    default_kept = split_stems(demo_splits.out)
    assert set(raw.loc[counted, "filestem"]) <= default_kept
    assert kept == default_kept - set(raw.loc[hit, "filestem"])
    assert reason not in common.read_json(demo_splits.out / "splits" / "test_report.json")["wrist"]["excluded"]


def test_include_metal_keeps_the_implant_rows(demo_splits, small_demo, tmp_path):
    raw = raw_rows(small_demo)
    metal = (raw["metal"] == 1) & ~not_modelled(raw)
    assert metal.sum() > 0, "the demo must hold implant rows, or this test cannot fail"
    stems = set(raw.loc[metal, "filestem"])
    # By default (the shared run) implants are dropped from every split and counted.
    default_kept = split_stems(demo_splits.out)
    default_excluded = common.read_json(demo_splits.out / "splits" / "test_report.json")["wrist"]["excluded"]
    assert not default_kept & stems, "implant rows are in the default splits"
    assert default_excluded["metal implant"] == metal.sum()
    assert f"{metal.sum()} metal implant" in (demo_splits.out / "splits" / "split_report.md").read_text()
    # With --include-metal they are all in the splits and nothing is counted as excluded for it.
    excluded, _ = run_splits(small_demo, tmp_path, ["--include-metal"])
    assert "metal implant" not in excluded
    assert split_stems(tmp_path) == default_kept | stems
