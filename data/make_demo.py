#!/usr/bin/env python
"""Write a small, deterministic demo of GRAZPEDWRI-DX and RSNA Bone Age in their published layouts.

The real datasets cannot be downloaded here, so this script draws synthetic radiographs whose
metadata is shaped like the real files and whose pixels carry honest, learnable signal. Every stage
of the pipeline can then run end to end on it, reading it exactly as it would read the real data.

Writes (default --out data/demo, relative to the repository root, whatever the working directory):
  grazpedwri/dataset.csv                          the 17 published columns, UTF-8 with byte-order
                                                  mark, CRLF, flags written `1` or left empty
  grazpedwri/images_part1/ ... images_part4/      <filestem>.png, 16-bit grayscale wrist radiographs
                                                  (AP, Lat and a few oblique; about 2:1 portrait)
  rsna_boneage/boneage-training-dataset.csv       id,boneage,male
  rsna_boneage/boneage-training-dataset/<id>.png  8-bit grayscale hand radiographs
  .demo_stamp.json                                the settings and a version number: a rerun with the
                                                  same settings returns at once

What the pictures show (drawn from a simple anatomical model in fixed units, then placed, scaled,
rotated, exposed and noised per image):
  projection   AP: radius and ulna side by side under two rows of carpals and five rays.
               Lat: the forearm bones overlap into one broad shadow, the carpals pile up and the
               hand is a narrow outline with the thumb pointing forward. Oblique: half way.
  age          bone size, density and cortex grow; the distal radius (from 1 y) and ulna (from
               6 y) epiphyses appear and widen; the dark growth-plate band (~8 px) narrows from
               14 y and is closed by ~16.5 y; carpals ossify one by one (none at birth, all eight
               by ~12 y). Girls mature ~8% earlier.
  fracture     fracture_visible rows: a break across the distal radius, or ulna, or both, at the
               level the AO code names (epiphysis, metaphysis, diaphysis); fixed per patient.
               Obvious (complete fractures, e.g. 23r-M/3.1): a dark gap (6-11 px) with displacement
               and angulation of the distal fragment, a buckled cortex and soft-tissue swelling,
               healing over follow-ups.
               Subtle (the torus/buckle codes, child code M/2 in the AO pediatric classification:
               ~36% of fractured images, the real file's share of first codes 23r-M/2.1, 23-M/2.1,
               23r-M/2.1; 23u-E/7): no displacement or angulation, only a small cortical buckle
               (bulges ~2-3 px across on both cortices, 60%) or a hairline break (a faint 1.5-3 px
               line, 40%), with mild swelling. Real pediatric wrist fractures are like this: 58% of
               metaphyseal fractures in children are incomplete (AO PCCF validation, Joeris et al.
               2017), and a 64 px input cannot resolve a 2 px line in a 360 px film.
               Other rows: intact cortex.
  truth        grazpedwri/demo_truth.csv (not part of the published layout; the pipeline never
               reads it): filestem, fracture_visible, fracture_kind = none | subtle | obvious, so
               an evaluation can report subtle and obvious fractures separately.
  cast, metal  a faint broad plaster shell; a bright plate with screws or crossed K-wires.
  laterality   R images are the mirror image of L.
  bone age     hand maturity (size, epiphyses and their fusion, carpal count) is a smooth function
               of bone age times 1.12 for girls, so a model needs the sex input to read it exactly.

Run (about 30 s on 2 idle cores for the defaults; ~310 MB):
  python data/make_demo.py                              # 900 patients (~3,000 wrist images), 1,600 hands
  python data/make_demo.py --force                      # regenerate even if the stamp matches
  python data/make_demo.py --wrist-patients 60 --boneage-images 60 --out /tmp/demo_small
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

DEMO_VERSION = 3  # bump when the drawing or the metadata model changes: stale demo folders regenerate
REPO_ROOT = Path(__file__).resolve().parent.parent
STAMP_NAME = ".demo_stamp.json"
WRIST_DIR, BONEAGE_DIR = "grazpedwri", "rsna_boneage"
WRIST_CSV = "dataset.csv"
TRUTH_CSV = "demo_truth.csv"  # the demo's own answer key, beside the published files
BONEAGE_CSV = "boneage-training-dataset.csv"
BONEAGE_IMAGES = "boneage-training-dataset"
IMAGE_PARTS = 4

GRAZ_COLUMNS = [
    "filestem", "patient_id", "study_number", "timehash", "gender", "age", "laterality", "projection",
    "initial_exam", "ao_classification", "cast", "diagnosis_uncertain", "osteopenia", "fracture_visible",
    "metal", "pixel_spacing", "device_manufacturer",
]

# ---- Figures measured once from the real GRAZPEDWRI-DX dataset.csv (20,327 images, 6,091 patients) ----
# Images per one-year age bin 0..19 (mean age 10.9 y).
REAL_IMAGES_PER_AGE_YEAR = [27, 211, 188, 305, 547, 780, 1067, 1179, 1473, 1750,
                            2121, 2197, 2108, 2004, 1549, 1292, 901, 555, 72, 1]
# Share of images with fracture_visible per one-year age bin (66.7% overall). The single 19-year
# image in the real file is normal; 0.29 (as at 17-18 y) keeps both classes in that bin.
REAL_FRACTURE_RATE_PER_AGE_YEAR = [0.63, 0.65, 0.53, 0.70, 0.81, 0.87, 0.89, 0.84, 0.79, 0.73,
                                   0.65, 0.64, 0.64, 0.62, 0.62, 0.51, 0.45, 0.28, 0.29, 0.29]
# Share of boys per five-year age band (0-4, 5-9, 10-14, 15-19); 2 of 20,327 images are gender O.
REAL_MALE_SHARE_PER_5Y = [0.54, 0.50, 0.63, 0.69]
# Projections within one study (patient, study_number): '12' = one AP and one Lat image.
REAL_STUDY_PROJECTIONS = {"12": 9137, "2": 697, "1": 570, "1122": 88, "11": 60, "13": 52,
                          "22": 43, "23": 22, "122": 10, "112": 6, "33": 5, "3": 4}
# Studies per patient, real: 1: 3993, 2: 903, 3: 505, 4: 331, 5: 199, 6: 104, 7+: 56 (max 12).
# Follow-up studies belong to fractures, so we draw them by fracture status with a shorter tail;
# together they give ~1.7 studies and ~3.3 images per patient as in the real file.
STUDIES_IF_FRACTURE = {1: 0.48, 2: 0.20, 3: 0.13, 4: 0.09, 5: 0.055, 6: 0.03, 7: 0.015}
STUDIES_IF_NORMAL = {1: 0.90, 2: 0.10}
# Age gap between consecutive studies: real 64% same day (0.0), 20% +0.1 y, rest up to ~8 y.
STUDY_AGE_GAPS = {0.0: 0.64, 0.1: 0.20, "weeks": 0.12, "years": 0.04}
# initial_exam per study number 1, 2, 3, 4+ (real 0.79, 0.31, 0.10, 0.07).
REAL_INITIAL_EXAM_BY_STUDY = [0.79, 0.31, 0.10, 0.07]
# Image-level flag rates, real: cast 28% (41% of fracture / 3.5% of normal images), metal 3.5%
# (4.4% / 1.7%, rising with follow-ups), osteopenia 12% (17.8% / 1.0%), diagnosis_uncertain 2.6%
# (0.8% / 6.4%). The per-study (cast, metal, uncertain) and per-patient (osteopenia) probabilities
# below are tuned so that the demo lands near those totals.
CAST_PROB = {"fracture_first": 0.27, "fracture_followup": 0.50, "normal": 0.02}
METAL_PROB = {"fracture_first": 0.01, "fracture_followup": 0.03, "normal": 0.01}
OSTEOPENIA_PROB = {"fracture": 0.15, "normal": 0.01}
UNCERTAIN_PROB = {"fracture": 0.008, "normal": 0.064}
# An AO code with no visible fracture: 3.8% of real images (missed on one view, or healed);
# within fractured two-image studies the two views disagree in ~10%.
VISIBLE_PROB_BY_STUDY = [0.96, 0.95, 0.93]  # study 1, 2, 3+
# Patient-level fracture probability = real image-level rate x this, because fractured patients
# bring more follow-up images; tuned so the demo's image-level rate is ~2/3 as in the real file.
PATIENT_FRACTURE_SCALE = 0.84
# Most frequent AO codes of fractured images (real counts; 3 real rows join codes with commas).
REAL_AO_CODES = {
    "23r-M/2.1": 3221, "23r-M/3.1; 23u-M/2.1": 1683, "23r-M/3.1; 23u-E/7": 1529, "23r-M/3.1": 1501,
    "23-M/3.1": 1436, "23-M/2.1": 1377, "23r-E/2.1; 23u-E/7": 630, "23r-E/2.1": 539,
    "23r-M/2.1; 23u-E/7": 316, "23r-M/3.1; 23u-M/2.1; 23u-E/7": 252, "23-M/3.1; 23u-E/7": 219,
    "23r-E/2.1; 23u-M/2.1": 193, "22r-D/2.1": 90, "22-D/2.1": 84, "23r-E/1": 84,
    "22r-D/2.1; 23u-M/2.1": 68, "23r-M/3.1; 23u-E/2.1": 54, "72B(b)": 42, "23u-E/7": 40,
    "23u-M/2.1": 38, "72B(c)": 38, "23r-M/3.1; 23u-E/1": 34, "22-D/4.1": 31, "22u-D/2.1": 25,
}
# Torus/buckle fractures (AO pediatric child code M/2) are drawn subtle; see the docstring.
SUBTLE_AO_PATTERN = re.compile(r"^2[23][ru]?-M/2\.")
AGFA_SHARE = 0.0055  # 112 of 20,327 images come from an Agfa device, with pixel spacing 0.143
MIN_AGE_YEAR_SHARE = 0.02  # see sample_age()

# ---- Figures measured once from the real RSNA Bone Age training labels (12,611 images) ----
# boneage months: mean 127.3, sd 41.2, min 1, max 228; 54.2% boys (mean 135 vs 118 for girls).
# Counts per 12-month bin (0-11, 12-23, ..., 228-239) by sex:
REAL_BONEAGE_HIST_MALE = [6, 47, 82, 106, 185, 188, 288, 274, 304, 370,
                          442, 862, 767, 1317, 822, 364, 145, 187, 58, 19]
REAL_BONEAGE_HIST_FEMALE = [7, 31, 93, 125, 119, 343, 451, 603, 592, 74,
                            768, 803, 633, 630, 180, 217, 64, 29, 16, 0]
REAL_MALE_SHARE = 0.542
REAL_FIRST_ID = 1377
GIRL_MATURITY_FACTOR = 1.12  # for the same bone age, a girl's hand looks like an older boy's


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/demo",
                        help="output folder; a relative path is taken from the repository root (default: data/demo)")
    parser.add_argument("--wrist-patients", type=int, default=900,
                        help="GRAZPEDWRI-DX patients; ~3.3 images each (default: 900 -> ~3,000 images)")
    parser.add_argument("--boneage-images", type=int, default=1600, help="RSNA hand images (default: 1600)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default: 0)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="drawing processes (default: 2, or 1 on a single core)")
    parser.add_argument("--force", action="store_true", help="regenerate even if the stamp says the demo is there")
    args = parser.parse_args(argv)
    if args.wrist_patients < 1 or args.boneage_images < 1:
        parser.error("--wrist-patients and --boneage-images must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out = out if out.is_absolute() else REPO_ROOT / out
    settings = {"version": DEMO_VERSION, "seed": args.seed,
                "wrist_patients": args.wrist_patients, "boneage_images": args.boneage_images}
    wrist_csv = out / WRIST_DIR / WRIST_CSV
    boneage_csv = out / BONEAGE_DIR / BONEAGE_CSV

    if not args.force and read_stamp(out) == {**settings, "complete": True} \
            and wrist_csv.exists() and boneage_csv.exists():
        print(f"demo data already present at {out} (use --force to regenerate)")
        return {"out": str(out), "skipped": True}

    started = time.time()
    clear_previous_demo(out)
    write_json_atomic(out / STAMP_NAME, {**settings, "complete": False})  # marks the folder as ours

    # Metadata first, from one random stream, so the tables do not depend on the worker count.
    rng = np.random.default_rng([args.seed, 0])
    wrist_table = build_wrist_table(args.wrist_patients, rng)
    boneage_table = build_boneage_table(args.boneage_images, rng)

    # Images next; each image has its own seed, so any worker can draw it identically.
    tasks = wrist_tasks(wrist_table, out / WRIST_DIR, args.seed) + boneage_tasks(boneage_table, out / BONEAGE_DIR, args.seed)
    for folder in {Path(task["path"]).parent for task in tasks}:
        folder.mkdir(parents=True, exist_ok=True)
    draw_all(tasks, args.workers)

    # CSVs last and atomically: an interrupted run never leaves a CSV naming missing images.
    write_csv_atomic(wrist_table[GRAZ_COLUMNS], wrist_csv, encoding="utf-8-sig", lineterminator="\r\n")
    write_csv_atomic(truth_table(wrist_table), out / WRIST_DIR / TRUTH_CSV, encoding="utf-8", lineterminator="\n")
    write_csv_atomic(boneage_table[["id", "boneage", "male"]], boneage_csv, encoding="utf-8", lineterminator="\n")
    write_json_atomic(out / STAMP_NAME, {**settings, "complete": True})

    seconds = time.time() - started
    print(f"demo data written to {out}: GRAZPEDWRI-DX {len(wrist_table)} images of "
          f"{wrist_table.patient_id.nunique()} patients "
          f"({(wrist_table.fracture_visible == '1').mean():.1%} fracture_visible, "
          f"{truth_table(wrist_table).fracture_kind.eq('subtle').mean():.1%} subtle), "
          f"RSNA bone age {len(boneage_table)} images, {seconds:.1f} s with {args.workers} worker(s)")
    return {"out": str(out), "skipped": False, "wrist_images": len(wrist_table),
            "boneage_images": len(boneage_table), "seconds": seconds}


# ------------------------------------------------------------------ output folder

def read_stamp(out):
    try:
        return json.loads((out / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def clear_previous_demo(out):
    """Remove an older demo, but never a folder this script did not write (it could be real data)."""
    ours = (out / STAMP_NAME).exists()
    if not ours and any((out / sub).exists() for sub in (WRIST_DIR, BONEAGE_DIR)):
        sys.exit(f"error: {out} already holds {WRIST_DIR}/ or {BONEAGE_DIR}/ but no {STAMP_NAME}, so it was "
                 f"not written by this script (it may be real data). Choose another --out or remove it by hand.")
    for sub in (WRIST_DIR, BONEAGE_DIR):
        shutil.rmtree(out / sub, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def write_json_atomic(path, obj):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def write_csv_atomic(table, path, encoding, lineterminator):
    tmp = path.with_name(path.name + ".tmp")
    table.to_csv(tmp, index=False, encoding=encoding, lineterminator=lineterminator)
    os.replace(tmp, path)


# ------------------------------------------------------------------ GRAZPEDWRI-DX metadata

def build_wrist_table(n_patients, rng):
    """One row per image with the 17 published columns as strings, formatted like the real file."""
    rows = []
    other_gender_patient = n_patients // 2 if n_patients >= 300 else -1  # the real file has one such patient
    for patient_id in range(1, n_patients + 1):
        rows += patient_rows(patient_id, n_patients, rng, other_gender=patient_id == other_gender_patient)
    table = pd.DataFrame(rows)
    join_a_few_codes_with_commas(table, rng)
    return table


def patient_rows(patient_id, n_patients, rng, other_gender=False):
    age = sample_age(rng)
    gender = "O" if other_gender else ("M" if rng.random() < REAL_MALE_SHARE_PER_5Y[min(int(age) // 5, 3)] else "F")
    fractured = rng.random() < min(0.92, REAL_FRACTURE_RATE_PER_AGE_YEAR[min(int(age), 19)] * PATIENT_FRACTURE_SCALE)
    n_studies = draw(rng, STUDIES_IF_FRACTURE if fractured else STUDIES_IF_NORMAL)
    ao_code = ""
    if fractured and rng.random() > 0.01:  # ~1% of real fracture images have no AO code
        ao_code = draw(rng, REAL_AO_CODES)
    side = "L" if rng.random() < 0.548 else "R"  # real: 11,135 L / 9,192 R images
    agfa = rng.random() < AGFA_SHARE
    osteopenia = rng.random() < OSTEOPENIA_PROB["fracture" if fractured else "normal"]
    metal = False
    study_ages, study_projections = [], []
    for study in range(n_studies):
        if study:
            age = min(19.0, round(age + study_age_gap(rng), 1))
        study_ages.append(age)
        study_projections.append(draw(rng, REAL_STUDY_PROJECTIONS))
    timehash = first_timehash(rng, study_ages)

    rows = []
    for study, (age, projections) in enumerate(zip(study_ages, study_projections), start=1):
        if study > 1:  # a follow-up now and then images the other wrist (real: 1.3% of studies)
            side = side if rng.random() > 0.015 else {"L": "R", "R": "L"}[side]
            timehash += int(max((age - study_ages[study - 2]) * 31_557_600, 0) + rng.integers(300_000, 3_000_000))
        order = list(projections) if rng.random() < 0.8 else list(reversed(projections))
        visible = [fractured and rng.random() < VISIBLE_PROB_BY_STUDY[min(study, 3) - 1] for _ in order]
        # Casts and implants go with a fracture still seen on film (real: cast on 3.5% of normal images).
        kind = "normal" if not any(visible) else ("fracture_first" if study == 1 else "fracture_followup")
        cast = rng.random() < CAST_PROB[kind]
        metal = metal or rng.random() < METAL_PROB[kind]  # an implant stays in for later studies
        uncertain = rng.random() < UNCERTAIN_PROB["fracture" if fractured else "normal"]
        initial = rng.random() < REAL_INITIAL_EXAM_BY_STUDY[min(study, 4) - 1]
        for projection, fracture_visible in zip(order, visible):
            timehash += int(rng.integers(15, 90))  # seconds between the views of one study
            rows.append({
                "filestem": f"{patient_id:04d}_{timehash:010d}_{study:02d}_WRI-{side}{projection}_{gender}{int(age):03d}",
                "patient_id": str(patient_id), "study_number": str(study), "timehash": str(timehash),
                "gender": gender, "age": format_age(age), "laterality": side, "projection": projection,
                "initial_exam": flag(initial), "ao_classification": ao_code, "cast": flag(cast),
                "diagnosis_uncertain": flag(uncertain), "osteopenia": flag(osteopenia),
                "fracture_visible": flag(fracture_visible), "metal": flag(metal),
                "pixel_spacing": "0.143" if agfa else "0.144", "device_manufacturer": "Agfa" if agfa else "Siemens",
                "image_part": 1 + (patient_id - 1) * IMAGE_PARTS // n_patients,
            })
    return rows


def sample_age(rng):
    """Age at the first study, in years with one decimal.

    The real age histogram, with every one-year bin raised to at least 2% of patients: the split
    stage stratifies its test set by 20 one-year bins, and the rare youngest and oldest bins must
    still hold patients of both classes in a 900-patient demo. The last bin is 19.0, the real maximum.
    """
    weights = np.array(REAL_IMAGES_PER_AGE_YEAR, float)
    weights = np.maximum(weights / weights.sum(), MIN_AGE_YEAR_SHARE)
    age = rng.choice(20, p=weights / weights.sum()) + rng.random()
    return round(min(max(age, 0.2), 19.0), 1)


def study_age_gap(rng):
    gap = draw(rng, STUDY_AGE_GAPS)
    if gap == "weeks":
        return rng.uniform(0.2, 1.0)
    if gap == "years":
        return rng.uniform(1.0, 4.0)
    return gap


def first_timehash(rng, study_ages):
    """A 10-digit number that grows with time within a patient (the real one is seconds-like)."""
    span = (study_ages[-1] - study_ages[0]) * 31_557_600 + len(study_ages) * 3_000_000
    return int(rng.integers(72_000_000, max(72_000_001, int(1_330_000_000 - span))))


def join_a_few_codes_with_commas(table, rng):
    """The real file has 3 rows whose codes are joined by ', ' instead of '; ': keep that quirk."""
    multi = table.index[table.ao_classification.str.contains("; ")]
    studies = table.loc[multi, ["patient_id", "study_number"]].drop_duplicates()
    if len(studies) == 0:
        return
    chosen = studies.iloc[rng.choice(len(studies), size=min(len(studies), 1 + len(table) // 2000), replace=False)]
    for _, study in chosen.iterrows():
        rows = (table.patient_id == study.patient_id) & (table.study_number == study.study_number)
        table.loc[rows, "ao_classification"] = table.loc[rows, "ao_classification"].str.replace("; ", ", ")


def draw(rng, weighted):
    """One key of {value: weight}, drawn in proportion to its weight."""
    keys = list(weighted)
    weights = np.array(list(weighted.values()), float)
    return keys[rng.choice(len(keys), p=weights / weights.sum())]


def flag(value):
    return "1" if value else ""


def format_age(age):
    """One decimal like the real file, which writes whole years without it ('12', '14.1')."""
    text = f"{age:.1f}"
    return text[:-2] if text.endswith(".0") else text


# ------------------------------------------------------------------ RSNA bone age metadata

def build_boneage_table(n_images, rng):
    male = rng.random(n_images) < REAL_MALE_SHARE
    boneage = np.empty(n_images, int)
    for sex_is_male, hist in ((True, REAL_BONEAGE_HIST_MALE), (False, REAL_BONEAGE_HIST_FEMALE)):
        chosen = np.flatnonzero(male == sex_is_male)
        weights = np.array(hist, float)
        bins = rng.choice(len(hist), size=len(chosen), p=weights / weights.sum())
        boneage[chosen] = bins * 12 + rng.integers(0, 12, size=len(chosen))
    boneage = np.clip(boneage, 1, 228)
    # Real ids run from 1377 upwards, mostly consecutive with small gaps.
    ids = REAL_FIRST_ID + np.concatenate([[0], np.cumsum(rng.choice([1, 2, 3], size=n_images - 1, p=[0.9, 0.09, 0.01]))])
    return pd.DataFrame({"id": ids, "boneage": boneage, "male": np.where(male, "True", "False")})


def is_subtle(ao_code):
    """A torus/buckle fracture by its first AO code: drawn without gap or displacement."""
    first = re.split(r"[;,]", ao_code or "")[0].strip()
    return bool(SUBTLE_AO_PATTERN.match(first))


def truth_table(table):
    """The demo's answer key per image: no fracture, a subtle one, or an obvious one."""
    visible = table.fracture_visible == "1"
    subtle = table.ao_classification.map(is_subtle)
    kind = np.where(~visible, "none", np.where(subtle, "subtle", "obvious"))
    return pd.DataFrame({"filestem": table.filestem, "fracture_visible": visible.astype(int),
                         "fracture_kind": kind})


# ------------------------------------------------------------------ drawing tasks

def wrist_tasks(table, root, seed):
    tasks = []
    for row in table.itertuples(index=False):
        tasks.append({
            "kind": "wrist", "path": str(root / f"images_part{row.image_part}" / f"{row.filestem}.png"),
            "image_seed": [seed, 1, int(row.timehash), int(row.patient_id)],
            "patient_seed": [seed, 2, int(row.patient_id)],
            "study_number": int(row.study_number), "projection": int(row.projection),
            "side": row.laterality, "age": float(row.age), "girl": row.gender == "F",
            "fracture": row.fracture_visible == "1", "ao_code": row.ao_classification,
            "cast": row.cast == "1", "metal": row.metal == "1", "osteopenia": row.osteopenia == "1",
        })
    return tasks


def boneage_tasks(table, root, seed):
    return [{"kind": "hand", "path": str(root / BONEAGE_IMAGES / f"{row.id}.png"),
             "image_seed": [seed, 4, int(row.id)], "boneage": int(row.boneage), "girl": row.male == "False"}
            for row in table.itertuples(index=False)]


def draw_all(tasks, workers):
    """Draw every image in `workers` processes (in this one for 1).

    Not forked from this process: a process that has drawn with OpenCV (or runs torch) holds
    threads, and a fork can copy a lock one of them holds; a drawing child then hung in
    cv2.setNumThreads (seen in the test suite). A fork server starts them clean, and finds
    draw_share by this module's name (a script's __main__, or `make_demo` on sys.path).
    """
    if workers <= 1:
        draw_share(tasks)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    processes = [context.Process(target=draw_share, args=(tasks[i::workers], True)) for i in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    if any(process.exitcode for process in processes):
        raise RuntimeError("a drawing process failed (see its traceback above); the demo was not marked complete")


def draw_share(tasks, in_child=False):
    if in_child:
        cv2.setNumThreads(1)  # one core per process: the processes already use all of them
        keep_freed_memory()
    for task in tasks:
        draw_and_save(task)


def keep_freed_memory():
    """Drawing allocates and frees hundreds of ~0.3 MB numpy temporaries per image; glibc returns
    each one to the kernel (mmap/munmap) and the page faults cost a third of the run. Keep freed
    memory in the heap instead. Only in the drawing processes; a no-op where libc is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD: serve blocks under 64 MB from the heap
        libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD: keep up to 256 MB of freed heap
    except (OSError, AttributeError):
        pass


def draw_and_save(task):
    image = draw_wrist(task) if task["kind"] == "wrist" else draw_hand(task)
    # Noise makes radiographs nearly incompressible: the RLE strategy is 2x faster than zlib's default.
    ok, png = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE])
    if not ok:
        raise RuntimeError(f"could not encode {task['path']}")
    Path(task["path"]).write_bytes(png.tobytes())


# ------------------------------------------------------------------ anatomy
# Anatomy is described in fixed units (about one pixel per unit for a teenager's wrist in a
# 180-px-wide image): x to the right, y towards the fingers, origin at the radiocarpal joint.
# AP is a left hand seen from the back (radius and thumb on the left); right hands are mirrored.
# Lat lists the same bones in the same order, so an oblique view is simply the average of both.

AP = {
    # forearm bones: proximal point, distal end (bottom of the epiphysis), radii at the proximal
    # point / the start of the metaphyseal flare (y = -50) / the distal end, epiphysis tilt (deg)
    "radius": ((-34, -900), (-26, -4), (10.5, 11.5, 20.0), -10.0),
    "ulna": ((30, -900), (20, -14), (7.0, 8.0, 10.0), 0.0),
    # carpals: x, y, half width, half height, angle; order: capitate, hamate, triquetrum, lunate,
    # trapezium, trapezoid, scaphoid, pisiform
    "carpals": np.array([(-4, 39, 8, 12, 0), (12, 37, 8, 10, -10), (14, 17, 7.5, 6.5, 20), (-4, 17, 9, 7.5, 0),
                         (-34, 35, 8, 7, -30), (-20, 39, 6.5, 6.5, 0), (-24, 17, 12, 7, -35), (22, 11, 5, 5, 0)], float),
    # rays (thumb, index, middle, ring, little): base x, y, angle from +y (deg, + towards +x),
    # metacarpal length, shaft radius
    "rays": np.array([(-36, 53, -38, 62, 6.5), (-20, 61, -6, 112, 5.8), (-5, 63, 0, 114, 5.8),
                      (9, 61, 6, 104, 5.3), (22, 56, 14, 94, 5.0)], float),
    # soft tissue: forearm and palm rods (start, end, radii) and the soft radius around each ray
    "forearm_soft": ((-4, -900), (-2, 0), (52.0, 46.0)),
    "palm_soft": ((-2, 5), (2, 150), (44.0, 44.0)),
    "ray_soft": np.array([11.0, 9.0, 9.5, 9.0, 8.5]),
}
LAT = {
    "radius": ((-6, -900), (-2, -4), (10.5, 11.5, 17.0), 10.0),
    "ulna": ((8, -900), (4, -14), (8.0, 8.5, 9.5), 0.0),
    "carpals": np.array([(1, 39, 7, 12, 0), (5, 37, 8, 9, 0), (6, 19, 7, 6, 0), (0, 17, 9, 7, 0),
                         (-11, 38, 7, 6, 30), (-6, 41, 6, 5, 20), (-6, 22, 11, 6, 50), (-10, 14, 5, 5, 0)], float),
    "rays": np.array([(-12, 51, -40, 62, 6.5), (-3, 61, 4, 112, 5.8), (0, 63, 5, 114, 5.8),
                      (3, 61, 6, 104, 5.3), (6, 58, 7, 94, 5.0)], float),
    "forearm_soft": ((2, -900), (2, 0), (42.0, 34.0)),
    "palm_soft": ((2, 5), (6, 160), (26.0, 20.0)),
    "ray_soft": np.array([10.0, 12.0, 12.0, 12.0, 11.0]),
}
CARPAL_ONSET_YEARS = np.array([0.2, 0.4, 2.5, 3.5, 4.5, 5.0, 5.5, 9.5])  # ossification, boys
PHALANX_FRACTIONS = {"finger": (0.56, 0.34, 0.24), "thumb": (0.62, 0.46)}  # of the metacarpal length


@functools.lru_cache(maxsize=None)
def view_anatomy(projection):
    """AP (1), Lat (2) or an oblique (3) half way between them."""
    weight = {1: 0.0, 2: 1.0, 3: 0.5}[projection]
    mix = lambda a, b: np.asarray(a, float) * (1 - weight) + np.asarray(b, float) * weight
    view = {}
    for key in AP:
        if isinstance(AP[key], tuple):
            view[key] = tuple(mix(a, b) for a, b in zip(AP[key], LAT[key]))
        else:
            view[key] = mix(AP[key], LAT[key])
    return view


def growth_scale(maturity):
    """Linear size of the wrist and hand relative to an adult: 0.42 at birth, 0.62 at 5, 0.77 at 10,
    0.89 at 14, 1 at 18. Bones keep growing through puberty, which separates teenagers from children."""
    return 0.42 + 0.58 * (float(np.clip(maturity, 0, 18)) / 18) ** 0.85


def bone_density(maturity):
    """Mineralisation rises through childhood: young bones look fainter against soft tissue."""
    return 0.6 + 0.4 * min(maturity / 17, 1.0)


def cortex_fraction(maturity):
    """Cortical thickness as a fraction of the bone radius: thin in infants, thicker in teenagers."""
    return 0.18 + 0.12 * min(maturity / 14, 1.0)


def epiphysis_size(maturity, onset, full_after=8.0):
    """0 before the ossification centre appears, then a nodule growing to full width."""
    if maturity < onset:
        return 0.0
    return min(1.0, 0.3 + 0.7 * (maturity - onset) / full_after)


def physis_width(maturity, closes_from, closed_at, open_width):
    """The growth plate stays open, then narrows and fuses between closes_from and closed_at."""
    return open_width * float(np.clip((closed_at - maturity) / (closed_at - closes_from), 0, 1))


# ------------------------------------------------------------------ drawing primitives

class Frame:
    """The pixel grid of one image expressed in anatomy units, so the anatomy is described once
    and only placed, scaled and rotated per image."""

    def __init__(self, height, width, center, pixels_per_unit, angle_deg):
        self.height, self.width = height, width
        self.cx, self.cy = center
        self.k = pixels_per_unit
        angle = math.radians(angle_deg)
        self.cos, self.sin = math.cos(angle), math.sin(angle)
        cols = ((np.arange(width, dtype=np.float32) - self.cx) / self.k)[None, :]
        rows = ((self.cy - np.arange(height, dtype=np.float32)) / self.k)[:, None]
        self.X = cols * self.cos + rows * self.sin
        self.Y = rows * self.cos - cols * self.sin

    def zeros(self):
        return np.zeros((self.height, self.width), np.float32)

    def window(self, points, pad):
        """Pixel slices around the given anatomy points (plus pad units), or None if off-image."""
        cols, rows = [], []
        for x, y in points:  # plain floats: this runs ~80 times per image on 2-4 points
            cols.append(self.cx + self.k * (x * self.cos - y * self.sin))
            rows.append(self.cy - self.k * (x * self.sin + y * self.cos))
        pad_px = pad * self.k + 2
        r0, r1 = max(int(min(rows) - pad_px), 0), min(int(max(rows) + pad_px) + 1, self.height)
        c0, c1 = max(int(min(cols) - pad_px), 0), min(int(max(cols) + pad_px) + 1, self.width)
        if r0 >= r1 or c0 >= c1:
            return None
        return slice(r0, r1), slice(c0, c1)


class Motion:
    """Rigid motion of a fracture fragment: rotation about a pivot, then a shift (anatomy units)."""

    def __init__(self, pivot=(0.0, 0.0), angle_deg=0.0, shift=(0.0, 0.0)):
        self.px, self.py = pivot
        angle = math.radians(angle_deg)
        self.cos, self.sin = math.cos(angle), math.sin(angle)
        self.dx, self.dy = shift

    def forward(self, points):
        pts = np.asarray(points, float).reshape(-1, 2)
        x, y = pts[:, 0] - self.px, pts[:, 1] - self.py
        return np.stack([self.px + x * self.cos - y * self.sin + self.dx,
                         self.py + x * self.sin + y * self.cos + self.dy], axis=1)

    def inverse(self, X, Y):
        x, y = X - self.px - self.dx, Y - self.py - self.dy
        return self.px + x * self.cos + y * self.sin, self.py - x * self.sin + y * self.cos


def paint(layer, frame, points, pad, density, combine="max", motion=None):
    """Evaluate density(X, Y) only in the window around points and merge it into layer.

    Pieces of one bone merge with max, so the joints between pieces stay invisible; different bones
    add up, so overlapping bones look denser, as they do on film.
    """
    if motion is not None:
        points = motion.forward(points)
    window = frame.window(points, pad)
    if window is None:
        return
    X, Y = frame.X[window], frame.Y[window]
    if motion is not None:
        X, Y = motion.inverse(X, Y)
    values = density(X, Y)
    if combine == "max":
        np.maximum(layer[window], values, out=layer[window])
    else:
        layer[window] += values


def rod(p0, p1, r0, r1, cortex=0.0, round_ends=False):
    """Projected thickness of a tapered cylinder from p0 to p1.

    A hollow cortex (fraction of the radius) makes the edges brighter than the marrow, as on a
    radiograph; flat ends let consecutive pieces of one bone join without a seam.
    """
    (x0, y0), (x1, y1) = p0, p1
    length = math.hypot(x1 - x0, y1 - y0)
    ax, ay = (x1 - x0) / length, (y1 - y0) / length

    def density(X, Y):
        dx, dy = X - x0, Y - y0
        along = dx * ax + dy * ay
        clipped = np.minimum(np.maximum(along, 0), length)
        if round_ends:
            ex, ey = dx - clipped * ax, dy - clipped * ay
            dist2 = ex * ex + ey * ey
        else:
            across = dx * ay - dy * ax
            dist2 = across * across
        radius2 = (r0 + (r1 - r0) / length * clipped) ** 2 if r1 != r0 else r0 * r0
        thick = np.sqrt(np.maximum(radius2 - dist2, 0))
        if cortex:
            inner = np.maximum(radius2 * (1 - cortex) ** 2 - dist2, 0)
            thick -= 0.8 * np.sqrt(inner)
        if not round_ends:
            thick *= along == clipped  # flat ends: nothing beyond either end
        return thick

    return density


def blob(center, half_w, half_h, angle_deg=0.0, squareness=2.0, rim=0.0, depth=None):
    """Projected thickness of an ellipsoid (squareness > 2 flattens its sides, like an epiphysis)."""
    cx, cy = center
    angle = math.radians(angle_deg)
    c, s = math.cos(angle), math.sin(angle)
    depth = min(half_w, half_h) if depth is None else depth

    def density(X, Y):
        dx, dy = X - cx, Y - cy
        u, v = (dx * c + dy * s) / half_w, (dy * c - dx * s) / half_h
        q = (u * u if squareness == 2 else np.abs(u) ** squareness) + v * v
        thick = np.sqrt(np.maximum(1 - q, 0))
        if rim:  # a cortical shell: the rim is denser than the spongy core
            thick = thick - rim * np.sqrt(np.maximum(1 - q / 0.6, 0))
        return (depth * thick).astype(np.float32)

    return density


def blob_extent(center, half_w, half_h):
    r = max(half_w, half_h)
    return [(center[0] - r, center[1] - r), (center[0] + r, center[1] + r)]


# ------------------------------------------------------------------ wrist radiograph (GRAZPEDWRI-DX)

def draw_wrist(task):
    rng = np.random.default_rng(task["image_seed"])
    patient = np.random.default_rng(task["patient_seed"])  # same person, same bones in every view
    size_factor, fracture_draws = patient.uniform(0.95, 1.05), patient.random(8)
    maturity = task["age"] * (1.08 if task["girl"] else 1.0)  # girls' physes close ~1 y earlier
    view = view_anatomy(task["projection"])

    height = int(rng.integers(320, 401))
    width = int(round(height * rng.uniform(0.46, 0.54)))
    scale = width / 180 * growth_scale(maturity) * size_factor * rng.uniform(0.97, 1.03)
    frame = Frame(height, width, (width * rng.uniform(0.44, 0.56), height * rng.uniform(0.36, 0.46)),
                  scale, rng.uniform(-8, 8))

    # Osteopenia: thinner, fainter bone.
    density = bone_density(maturity) * (0.72 if task["osteopenia"] else 1.0)
    cortex = cortex_fraction(maturity) - (0.06 if task["osteopenia"] else 0)
    fractures = plan_fractures(task, fracture_draws) if task["fracture"] else {}

    soft, bones = draw_skeleton(frame, view, maturity, cortex, fractures)
    bones *= density
    if fractures:  # soft-tissue swelling around a fresh fracture, a real radiological sign
        swelling, half_w = (0.0, min(plan["level"] for plan in fractures.values())), view["forearm_soft"][2][1] + 5
        mild = 0.4 if any(plan["subtle"] for plan in fractures.values()) else 1.0
        paint(soft, frame, blob_extent(swelling, half_w, 40), 0,
              blob(swelling, half_w, 40, depth=mild * 9.0 * max(0.3, 1.2 - 0.3 * task["study_number"])), combine="add")
    extra = frame.zeros()
    if task["cast"]:
        draw_cast(extra, frame, view, rng)
    if task["metal"]:
        draw_metal(extra, frame, view, patient)

    image = expose(soft, bones, extra, rng)
    # A 12-bit detector scaled to 16 bits, with an offset: raw values span ~8,000-62,000.
    image = (8000 + image * rng.uniform(46000, 56000)).astype(np.uint16) & 0xFFF0
    return np.ascontiguousarray(image[:, ::-1]) if task["side"] == "R" else image


def draw_skeleton(frame, view, maturity, cortex, fractures=None):
    """Soft tissue and bone thickness maps of one wrist or hand (bones not yet scaled by density)."""
    soft, bones = frame.zeros(), frame.zeros()
    draw_soft_tissue(soft, frame, view)
    for name in ("radius", "ulna"):
        draw_forearm_bone(bones, frame, view[name], name, maturity, cortex, (fractures or {}).get(name))
    draw_carpals(bones, frame, view, maturity)
    draw_rays(bones, frame, view, maturity, cortex)
    return soft, bones


def plan_fractures(task, draws):
    """Where the bones break, from the AO code: 23/22 = distal forearm/shaft, r/u = radius/ulna
    (none = both), E/M/D = epiphysis, metaphysis, diaphysis. Fixed per patient, so AP and Lat
    of one study and the follow-ups show the same fracture; the gap narrows as it heals."""
    first = re.split(r"[;,]", task["ao_code"])[0].strip()
    match = re.match(r"(2[23])([ru]?)-([EMD])", first)
    bone, segment = (match.group(2), match.group(3)) if match else ("r", "M")  # e.g. 72B(b): treat as radius
    bones = {"r": ["radius"], "u": ["ulna"], "": ["radius", "ulna"]}[bone]
    healing = max(0.55, 1.0 - 0.15 * (task["study_number"] - 1))
    subtle = is_subtle(task["ao_code"])
    plans = {}
    for i, name in enumerate(bones):
        level = {"E": -8 - 6 * draws[0], "M": -18 - 40 * draws[0], "D": -70 - 60 * draws[0]}[segment]
        if subtle:  # torus/buckle: the cortex bulges or cracks in place, nothing moves
            plans[name] = {"level": level - 6 * i, "line_angle": (draws[1] - 0.5) * 50, "subtle": True,
                           "buckle": draws[3] < 0.6, "gap_px": 1.5 + 1.5 * draws[2], "angulation": 0.0,
                           "shift": (0.0, 0.0), "phase": draws[7] * 6.283}
            continue
        plans[name] = {
            "level": level - 6 * i,                                  # both-bone fractures: ulna a bit lower
            "line_angle": (draws[1] - 0.5) * 50,                      # obliquity of the fracture line
            "gap_px": (6.0 + 5.0 * draws[2]) * healing,               # several source pixels wide
            "angulation": (10 + 12 * draws[3]) * (1 if draws[4] < 0.7 else -1) * healing,
            "shift": ((3 + 5 * draws[5]) * (1 if draws[6] < 0.5 else -1) * healing, -2 - 3 * draws[6]),
            "phase": draws[7] * 6.283, "subtle": False, "buckle": False,
        }
    return plans


def draw_soft_tissue(layer, frame, view):
    (p0, p1, radii) = view["forearm_soft"]
    paint(layer, frame, [p0, p1], radii.max(), rod(p0, p1, radii[0], radii[1], round_ends=True))
    (p0, p1, radii) = view["palm_soft"]
    paint(layer, frame, [p0, p1], radii.max(), rod(p0, p1, radii[0], radii[1], round_ends=True))
    for index, (ray, soft_radius) in enumerate(zip(view["rays"], view["ray_soft"])):
        base, tip = ray_points(ray, thumb=index == 0)
        paint(layer, frame, [base, tip], soft_radius, rod(base, tip, soft_radius, soft_radius * 0.8, round_ends=True))


def draw_forearm_bone(layer, frame, geometry, name, maturity, cortex, fracture):
    """Shaft, metaphyseal flare, growth plate and epiphysis of the radius or ulna, and a fracture."""
    (start, end, (r_shaft, r_flare, r_end), tilt) = geometry
    onset, closes_from, closed_at = (1.0, 14.0, 16.5) if name == "radius" else (6.0, 14.5, 17.0)
    axis = (end - start) / np.linalg.norm(end - start)
    normal = np.array([-axis[1], axis[0]])
    # The open growth plate is cartilage: a dark band ~8 px wide whatever the child's size, so it
    # survives downscaling to ~2 px.
    physis = physis_width(maturity, closes_from, closed_at, 8.0 / frame.k)
    size = epiphysis_size(maturity, onset)
    metaphysis_end = end - axis * physis
    flare_start = start + axis * (np.dot(np.array([0, -50.0]) - start, axis))
    level = fracture["level"] if fracture else None
    break_point = start + axis * (np.dot(np.array([0, level]) - start, axis)) if fracture else None

    # Pieces proximal to the fracture stay put; the distal fragment (and the epiphysis) moves.
    nodes = [(start, r_shaft), (flare_start, r_flare), (metaphysis_end, r_end)]
    motion, r_break = None, None
    if fracture:
        t_nodes = [np.dot(p - start, axis) for p, _ in nodes]
        t_break = min(np.dot(break_point - start, axis), t_nodes[-1] - 4)  # never inside the growth plate
        break_point = start + axis * t_break
        r_break = float(np.interp(t_break, t_nodes, [r for _, r in nodes]))
        nodes = [n for n, t in zip(nodes, t_nodes) if t < t_break] + [(break_point, r_break)] + \
                [n for n, t in zip(nodes, t_nodes) if t > t_break]
        motion = Motion(pivot=tuple(break_point), angle_deg=fracture["angulation"], shift=fracture["shift"])
    bone = frame.zeros()
    for (p0, r0), (p1, r1) in zip(nodes[:-1], nodes[1:]):
        distal = fracture is not None and np.dot(p0 - break_point, axis) >= -1e-6
        paint(bone, frame, [p0, p1], max(r0, r1), rod(p0, p1, r0, r1, cortex), motion=motion if distal else None)
    if physis > 0 and size > 0:  # the dense zone of provisional calcification lines an open physis
        line = metaphysis_end - axis * 1.5
        paint(bone, frame, blob_extent(line, r_end, 2), 0,
              blob(line, r_end * 0.95, 1.8, tilt * 0.5, squareness=6, depth=0.25 * r_end), combine="add", motion=motion)
    if size > 0:
        height = (5 + 9 * size) if name == "radius" else (4 + 6 * size)
        center = end + axis * (height / 2) + normal * (0.0 if name == "radius" else 1.0)
        paint(bone, frame, blob_extent(center, r_end * 1.05, height), 0,
              blob(center, r_end * 1.05 * size, height / 2, tilt, squareness=4, depth=0.55 * r_end * size), motion=motion)
    if fracture and fracture["subtle"]:
        if fracture["buckle"]:  # a bulge a few pixels across on each cortex, no break line
            for side in (-1, 1):
                bump = break_point + normal * side * r_break
                half_w, half_h = 1.2 / frame.k, 1.6 / frame.k
                paint(bone, frame, blob_extent(bump, half_w + 1, half_h + 1), 0,
                      blob(bump, half_w, half_h, depth=3.0), combine="add")
        else:  # a hairline: a thin, faint line; the bone is cracked, not separated
            cut_fracture_gap(bone, frame, break_point, axis, max(r_flare, r_end) + 4, fracture, residual=0.45)
    elif fracture:
        cut_fracture_gap(bone, frame, break_point, axis, max(r_flare, r_end) + 4, fracture)
        for side in (-1, 1):  # the cortex buckles next to the break, as in a torus fracture
            bump = break_point - axis * (fracture["gap_px"] / frame.k) + normal * side * r_break
            paint(bone, frame, blob_extent(bump, 4, 4), 0, blob(bump, 3.5, 4.5, depth=5.0), combine="add")
    layer += bone


def cut_fracture_gap(bone, frame, point, axis, reach, fracture, residual=0.12):
    """A dark, slightly wavy band across the bone where the cortex is broken (`residual`: the
    share of bone left in the band; a hairline crack keeps more than a separated fracture)."""
    angle = math.radians(fracture["line_angle"])
    across = np.array([axis[0] * math.cos(angle) + axis[1] * math.sin(angle),
                       -axis[0] * math.sin(angle) + axis[1] * math.cos(angle)])  # the line's normal
    tangent = np.array([-across[1], across[0]])
    half_gap = fracture["gap_px"] / frame.k / 2
    window = frame.window([point - tangent * reach, point + tangent * reach], half_gap + 6)
    if window is None:
        return
    dx, dy = frame.X[window] - point[0], frame.Y[window] - point[1]
    along_line = dx * tangent[0] + dy * tangent[1]
    offset = dx * across[0] + dy * across[1] + 1.5 * np.sin(along_line * 0.35 + fracture["phase"])
    inside = np.clip((np.abs(offset) - half_gap) / 1.2 + 0.5, 0, 1)  # soft edge over ~1 unit
    bone[window] *= (residual + (1 - residual) * inside).astype(np.float32)


def draw_carpals(layer, frame, view, maturity):
    for (x, y, half_w, half_h, angle), onset in zip(view["carpals"], CARPAL_ONSET_YEARS):
        if maturity < onset:
            continue
        size = min(1.0, 0.3 + 0.7 * (maturity - onset) / 6)
        paint(layer, frame, blob_extent((x, y), half_w, half_h), 0,
              blob((x, y), half_w * size, half_h * size, angle, rim=0.35), combine="add")


def ray_points(ray, thumb):
    x, y, angle, length, _ = ray
    direction = np.array([math.sin(math.radians(angle)), math.cos(math.radians(angle))])
    fractions = PHALANX_FRACTIONS["thumb" if thumb else "finger"]
    total = length * (1 + sum(fractions)) + 5 * len(fractions)
    return np.array([x, y]), np.array([x, y]) + direction * total


def draw_rays(layer, frame, view, maturity, cortex):
    """Metacarpals and phalanges. Epiphyses sit distally on metacarpals 2-5 and proximally on the
    thumb metacarpal and on every phalanx, as in a real hand; they fuse at ~13-16 y."""
    for index, ray in enumerate(view["rays"]):
        thumb = index == 0
        x, y, angle, length, radius = ray
        direction = np.array([math.sin(math.radians(angle)), math.cos(math.radians(angle))])
        position = np.array([x, y])
        lengths = [length] + [length * f for f in PHALANX_FRACTIONS["thumb" if thumb else "finger"]]
        for bone_index, bone_length in enumerate(lengths):
            metacarpal = bone_index == 0
            bone_radius = radius * (1.0 if metacarpal else 0.9 - 0.1 * bone_index)
            epiphysis_distal = metacarpal and not thumb
            closes = (15.0, 16.5) if metacarpal else (13.5, 15.5)
            draw_long_bone(layer, frame, position, direction, bone_length, bone_radius, epiphysis_distal,
                           maturity, closes, cortex)
            position = position + direction * (bone_length + 5)  # joint space


def draw_long_bone(layer, frame, start, direction, length, radius, epiphysis_distal, maturity, closes, cortex):
    epiphysis_height = min(0.16 * length, 12.0)
    physis = physis_width(maturity, closes[0], closes[1], 4.0)
    size = epiphysis_size(maturity, 1.5)
    end = start + direction * length
    if epiphysis_distal:
        shaft_start, shaft_end = start, end - direction * (epiphysis_height + physis)
        epiphysis_center = end - direction * epiphysis_height / 2
    else:
        shaft_start, shaft_end = start + direction * (epiphysis_height + physis), end
        epiphysis_center = start + direction * epiphysis_height / 2
    middle = (shaft_start + shaft_end) / 2
    bone = []  # waisted shaft: wider at both ends
    for p0, p1, r0, r1 in ((shaft_start, middle, radius * 1.3, radius), (middle, shaft_end, radius, radius * 1.2)):
        if np.dot(p1 - p0, direction) > 0.5:
            bone.append((p0, p1, r0, r1))
    for p0, p1, r0, r1 in bone:
        paint(layer, frame, [p0, p1], max(r0, r1), rod(p0, p1, r0, r1, cortex))
    if size > 0:
        angle = math.degrees(math.atan2(direction[0], direction[1]))
        half_w, half_h = radius * 1.3 * size, epiphysis_height / 2 * (0.5 + 0.5 * size)
        paint(layer, frame, blob_extent(epiphysis_center, radius * 1.3, epiphysis_height), 0,
              blob(epiphysis_center, half_w, half_h, -angle, squareness=3), combine="add")


def draw_cast(layer, frame, view, rng):
    """Plaster: a shell around forearm and wrist, faint and mottled."""
    (_, _, radii) = view["forearm_soft"]
    start, end = np.array([0.0, -320.0]), np.array([2.0, 100.0 + 20 * rng.random()])
    outer = radii.max() + 8
    shell = rod(start, end, outer, outer - 4, round_ends=True)
    inside = rod(start, end, outer - 7, outer - 11, round_ends=True)
    paint(layer, frame, [start, end], outer, lambda X, Y: 0.55 * (shell(X, Y) - 0.8 * inside(X, Y)), combine="add")
    layer *= smooth_noise(frame.height, frame.width, rng, 0.25, cells=12)


def draw_metal(layer, frame, view, rng):
    """A plate with screws along the radius (volar in Lat), or two crossed K-wires."""
    (start, end, (_, _, r_end), _) = view["radius"]
    axis = (end - start) / np.linalg.norm(end - start)
    normal = np.array([-axis[1], axis[0]])
    metal = frame.zeros()
    if rng.random() < 0.5:
        side = -normal * (r_end * 0.8)
        p0, p1 = end - axis * 120 + side * 0.7, end - axis * 12 + side
        paint(metal, frame, [p0, p1], 4, rod(p0, p1, 3.0, 3.0))
        for t in np.linspace(0.15, 0.85, 4):
            centre = p0 + (p1 - p0) * t
            a, b = centre - normal * 20, centre + normal * 20
            paint(metal, frame, [a, b], 3, rod(a, b, 1.8, 1.8), combine="add")
    else:
        for offset in (-1.0, 1.0):
            a = end + normal * (-r_end * 0.9) + axis * 6
            b = end - axis * 70 + normal * (offset * 12 + 4)
            paint(metal, frame, [a, b], 2, rod(a, b, 1.3, 1.3), combine="add")
    layer += 40.0 * metal


def smooth_noise(height, width, rng, amplitude, cells):
    """1 +- amplitude, varying smoothly over about `cells` blobs across the image."""
    coarse = rng.standard_normal((max(2, height * cells // max(height, width)), max(2, width * cells // max(height, width))))
    return (1 + amplitude * cv2.resize(coarse.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC))


def expose(soft, bones, extra, rng, noise=(0.012, 0.03)):
    """Thicknesses -> film brightness in [0, 1] with random exposure, contrast, blur and noise."""
    total = 0.011 * soft + 0.075 * bones + 0.02 * extra
    total *= smooth_noise(*total.shape, rng, 0.04, cells=4)  # uneven exposure
    total = cv2.GaussianBlur(total, (0, 0), rng.uniform(0.5, 0.9))
    image = 1 - np.exp(-rng.uniform(0.85, 1.3) * total)  # random exposure: contrast varies
    image = 0.03 + 0.94 * image + rng.uniform(*noise) * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image, 0, 1)


# ------------------------------------------------------------------ hand radiograph (RSNA bone age)

def draw_hand(task):
    rng = np.random.default_rng(task["image_seed"])
    maturity = task["boneage"] / 12 * (GIRL_MATURITY_FACTOR if task["girl"] else 1.0)
    view = view_anatomy(1)
    height, width = int(rng.integers(220, 261)), int(rng.integers(200, 241))
    # An adult hand spans ~390 x 190 units around (-10, 135), from the distal forearm to the
    # middle fingertip; younger hands fill less of the film.
    scale = 0.92 * min(height / 390, width / 200) * growth_scale(maturity) * rng.uniform(0.93, 1.07)
    center = (width / 2 + 10 * scale + rng.uniform(-0.04, 0.04) * width,
              height / 2 + 135 * scale + rng.uniform(-0.04, 0.04) * height)  # where the wrist joint lands
    frame = Frame(height, width, center, scale, rng.uniform(-10, 10))
    soft, bones = draw_skeleton(frame, view, maturity, cortex_fraction(maturity))
    image = expose(soft, bones * bone_density(maturity), frame.zeros(), rng, noise=(0.01, 0.025))
    return np.round(image * rng.uniform(215, 255)).astype(np.uint8)


if __name__ == "__main__":
    main()
