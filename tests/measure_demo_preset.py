"""Which demo-preset image size and model learn the subtle demo fractures, at what CPU cost? (not pytest)

For each (arch, image size) it runs stage 04 on the AP projection of the demo with the preset's
pooled start: the all-ages pooled model, then age group 2 fine-tuned from it (the largest group;
the others cost the same per image). It records training images/s (median over epochs, from
history.csv), the wall time, and test AUC of the pooled and the fine-tuned model for subtle and
obvious fractures (data/subtle_vs_obvious.py). Timings depend on what else runs on the cores.

With --steps N it only times N training steps per configuration (forward, focal loss, backward,
AdamW; random 1-channel batches): the compute cost alone, in seconds rather than minutes.

Run (after 01 and 02 on the demo into OUT):
  python tests/measure_demo_preset.py --splits OUT --work /tmp/preset --epochs 6
  python tests/measure_demo_preset.py --steps 20          # training-step images/s only
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--splits", type=Path, help="an --out folder holding splits/ (01, 02)")
    parser.add_argument("--work", type=Path, help="scratch folder, one run per configuration")
    parser.add_argument("--steps", type=int, help="only time this many training steps per configuration")
    parser.add_argument("--batch-size", type=int, default=32, help="with --steps (default: 32, the demo preset's)")
    parser.add_argument("--archs", default="test_resnet,resnet10t")
    parser.add_argument("--sizes", default="64,96,128")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--threads", default="2", help="OMP_NUM_THREADS of each run (default: 2, as the demo)")
    args = parser.parse_args(argv)
    if args.steps:
        return _time_steps(args)
    if not (args.splits and args.work):
        parser.error("--splits and --work are needed unless --steps is given")
    results = []
    for arch in args.archs.split(","):
        for size in [int(s) for s in args.sizes.split(",")]:
            out = args.work / f"{arch}_{size}"
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(args.splits / "splits", out / "splits")
            command = [sys.executable, "04_train_fracture_ddp.py", "--out", str(out), "--preset", "demo",
                       "--device", "cpu", "--arch", arch, "--image-size", str(size), "--projections", "AP",
                       "--groups", "2", "--epochs", str(args.epochs), "--bootstrap", "200"]
            started = time.perf_counter()
            run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": args.threads})
            seconds = time.perf_counter() - started
            if run.returncode:
                print(run.stdout[-3000:], run.stderr[-3000:])
                raise SystemExit(f"{arch} at {size}: stage 04 failed")
            subprocess.run([sys.executable, "data/subtle_vs_obvious.py", "--out", str(out), "--bootstrap", "200"],
                           cwd=ROOT, check=True, capture_output=True)
            kinds = pd.read_csv(out / "fracture" / "subtle_vs_obvious.csv").query("scope == 'AP_group2'")
            row = {"arch": arch, "size": size, "wall_s": round(seconds, 1)}
            for model in ("pooled", "group2"):
                history = pd.read_csv(out / "fracture" / "AP" / model / "history.csv")
                row[f"{model}_img_s"] = round(float(history["images_per_s"].median()), 1)
                row[f"{model}_train_s"] = round(float(history["seconds"].sum()), 1)
            for arm in ("pooled", "from_pooled"):
                for kind in ("subtle", "obvious", "all"):
                    hit = kinds[(kinds["arm"] == arm) & (kinds["kind"] == kind)].iloc[0]
                    row[f"{arm}_{kind}"] = f"{hit.auc:.2f} [{hit.auc_lo:.2f}, {hit.auc_hi:.2f}]"
            results.append(row)
            print(json.dumps(row), flush=True)
    print(pd.DataFrame(results).to_string(index=False))


def _time_steps(args) -> None:
    """Median seconds per training step, as images/s, for every (arch, size)."""
    import torch
    sys.path.insert(0, str(ROOT))
    import common
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    rows = []
    for arch in args.archs.split(","):
        for size in [int(s) for s in args.sizes.split(",")]:
            torch.manual_seed(0)
            model = common.create_model(arch, num_classes=1)
            settings = common.TrainSettings(epochs=1, batch_size=args.batch_size, lr=1e-3)
            optimizer = common._make_optimizer(model, settings, on_cuda=False)
            images = torch.randn(args.batch_size, 1, size, size)
            targets = (torch.rand(args.batch_size) > 0.5).float()
            times = []
            for step in range(args.steps + 3):  # 3 warm-up steps
                started = time.perf_counter()
                loss = common.binary_focal_loss(model(images).squeeze(1), targets)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if step >= 3:
                    times.append(time.perf_counter() - started)
            seconds = sorted(times)[len(times) // 2]
            rows.append({"arch": arch, "size": size, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                         "s_per_step": round(seconds, 3), "img_s": round(args.batch_size / seconds, 1)})
            print(json.dumps(rows[-1]), flush=True)
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
