"""GPU acceptance run: the figures a GPU user needs, in one command that fits 12 minutes on one H100/H200.

Steps, each a subprocess with its own time limit (a step that runs over is stopped and recorded,
and the next one still runs); the JSON is rewritten after every step, so a stopped run keeps the
figures gathered so far:
  demo data, 01, 02   data/make_demo.py writes synthetic wrist and hand radiographs (~400x200 px,
                      letterboxed to the full preset's 384/512 px by the stages' cache), 01 and 02
                      split them
  benchmark           tests/benchmark_train.py for convnextv2_tiny at 384 px, batch 64, compiled:
                      (a) model-only ceiling, (b) the project's training loop from the cache with
                      4 loader workers, (c) the original-style fp32 decode-every-step loop;
                      b/a (goal >= 0.9) and b/c (goal >= 4)
  03, 04, 05          each stage as run_all.py launches it (torchrun for --nproc-per-node 2+)
                      with its full-preset architecture, random init,
                      bf16 + channels_last (the stages do that on CUDA), --compile, 2 short epochs:
                      exit status, training img/s of the 2nd epoch (the 1st includes compiling)
                      and peak GPU memory (history.csv); 04 trains its largest group only
  07                  tests/benchmark_predict.py: 07_predict's forward pass, bf16, for the full
                      preset's fracture model at batch 32 on real preprocessed radiographs
Every figure carries the GPU name, the torch version and the exact command. Nothing is downloaded
(random init), and neither pydicom nor grad-cam is needed.

Run from the repository root on a machine with one GPU (12 minutes at most):
  python tests/gpu_acceptance.py --out results/gpu_acceptance.json
Dry run: the same steps on the CPU at toy sizes (tiny models, 32 px, no --compile), as CI runs it:
  python tests/gpu_acceptance.py --dry-run --out /tmp/gpu_acceptance_dry.json
Writes OUT (the JSON) and OUT's stem + _logs/ (one log per step); scratch data goes to OUT's
stem + _work/, removed at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

# Seconds per step on the GPU, 680 in all: with start-up the run stays within 12 minutes even if
# every step uses its whole share. Compiling a large model takes most of a training stage's share.
TIME_LIMITS = {"demo data": 45, "01": 25, "02": 25, "benchmark": 190, "03": 120, "04": 110,
               "05": 90, "07": 45}
BUDGET_S = 690
DRY_RUN_SLACK = 4  # a dry run on a busy 2-core CI machine is slower than the GPU run it rehearses
GOALS = {"b_over_a": 0.9, "b_over_c": 4.0}
DRY_ARCH = "test_resnet"  # the dry run's tiny model for every step (0.4 M parameters)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/gpu_acceptance.json"),
                        help="the JSON to write (default: results/gpu_acceptance.json)")
    parser.add_argument("--dry-run", action="store_true",
                        help="the same steps on the CPU at toy sizes (what CI runs)")
    parser.add_argument("--nproc-per-node", type=int, default=1,
                        help="processes (GPUs) for 03/04/05; 2+ also exercises NCCL (default: 1)")
    parser.add_argument("--budget-s", type=float,
                        help=f"seconds for all steps; each step's limit scales with it (default: {BUDGET_S}, "
                             f"x{DRY_RUN_SLACK} for a dry run)")
    args = parser.parse_args(argv)
    args.budget_s = args.budget_s or BUDGET_S * (DRY_RUN_SLACK if args.dry_run else 1)
    return args


def main(argv=None):
    args = parse_args(argv)
    started = time.monotonic()
    deadline = started + args.budget_s
    out = args.out
    logs = common.ensure_writable_dir(out.parent / f"{out.stem}_logs")
    work = out.parent / f"{out.stem}_work"
    shutil.rmtree(work, ignore_errors=True)
    given = argv if argv is not None else sys.argv[1:]
    report = {"command": shlex.join(["python", "tests/gpu_acceptance.py", *given]),
              "dry_run": args.dry_run, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "environment": _environment(args), "steps": [], "figures": []}
    common.write_json(report, out)

    def step(name, command):
        limit = min(TIME_LIMITS[name] * args.budget_s / BUDGET_S, deadline - time.monotonic())
        return _run_step(report, name, command, limit, logs, out)

    try:
        data = _make_data(args, work, step)
        if data:
            _benchmark_training(args, work, report, step)
            for stage in ("03", "04", "05"):
                _train_stage(stage, args, data, report, step)
            _benchmark_inference(args, data, work, report, step)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        report["wall_s"] = round(time.monotonic() - started, 1)
        common.write_json(report, out)
    _print_table(report, out)
    failed = [s["step"] for s in report["steps"] if s["exit_status"] != 0]
    if failed:
        sys.exit(f"error: step(s) {', '.join(failed)} failed or ran out of time; "
                 f"their logs are in {_shown(logs)}")


def _environment(args) -> dict:
    """Where the figures come from; also fails early if a GPU run finds no GPU."""
    import importlib.util

    import torch
    if not args.dry_run and not torch.cuda.is_available():
        raise common.InputError("no CUDA GPU is visible to PyTorch; this run is for a GPU machine "
                                "(use --dry-run for the CPU rehearsal)")
    return {"gpu": torch.cuda.get_device_name(0) if not args.dry_run else "none (CPU dry run)",
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
            "cpu_count": os.cpu_count(), "nproc_per_node": args.nproc_per_node,
            "installed": {name: importlib.util.find_spec(name) is not None
                          for name in ("timm", "pydicom", "pytorch_grad_cam")}}


def _make_data(args, work: Path, step) -> dict | None:
    """Synthetic wrist and hand radiographs, split by 01 and 02; the splits' folder and 04's group."""
    demo, out = work / "demo", work / "outputs"
    patients, hands, per_cell = ("60", "60", "1") if args.dry_run else ("300", "600", "2")
    workers = str(min(8, os.cpu_count() or 1))
    if step("demo data", [sys.executable, "data/make_demo.py", "--out", _shown(demo), "--wrist-patients",
                          patients, "--boneage-images", hands, "--workers", workers, "--seed", "0"]) != 0:
        return None
    flags = ["--data", _shown(demo / "grazpedwri"), "--boneage-data", _shown(demo / "rsna_boneage"),
             "--out", _shown(out), "--seed", "0"]
    if step("01", [sys.executable, "01_split_test.py", *flags, "--per-cell", per_cell]) != 0 or \
            step("02", [sys.executable, "02_split_trainval.py", *flags]) != 0:
        return None
    groups = pd.read_csv(out / "splits" / "group_status.csv")
    largest = groups[groups["trainable"]].sort_values("n_train").iloc[-1]
    return {"flags": flags, "out": out, "wrist": demo / "grazpedwri",
            "projection": largest["projection"], "group": int(largest["age_group"])}


def _benchmark_training(args, work: Path, report: dict, step) -> None:
    """tests/benchmark_train.py: (a), (b), (c) and the ratios b/a and b/c."""
    result_path = work / "benchmark_train.json"
    if args.dry_run:
        sizes = ["--arch", DRY_ARCH, "--image-size", "32", "--batch-size", "8", "--n-images", "16",
                 "--source-size", "200x100", "--steps", "2", "--warmup", "1", "--epochs", "2",
                 "--workers", "0", "--baseline-workers", "0", "--device", "cpu"]
    else:
        baseline_workers = str(max(1, min(14, (os.cpu_count() or 2) - 2)))
        sizes = ["--arch", "convnextv2_tiny", "--image-size", "384", "--batch-size", "64", "--compile",
                 "--n-images", "256", "--steps", "30", "--warmup", "5", "--epochs", "3",
                 "--workers", "4", "--baseline-workers", baseline_workers, "--device", "cuda"]
    command = [sys.executable, "tests/benchmark_train.py", *sizes, "--out", _shown(result_path)]
    step("benchmark", command)
    result = common.read_json(result_path) if result_path.is_file() else {}
    arch = f"{result.get('arch', sizes[1])} @{sizes[3]} px, batch {sizes[5]}"
    for key, name in (("a_model_ceiling_img_s", "(a) model-only ceiling, train img/s"),
                      ("b_project_loop_img_s", "(b) project loop from the cache, train img/s"),
                      ("c_original_style_img_s", "(c) original-style fp32 decode loop, train img/s"),
                      ("b_over_a", "b/a"), ("b_over_c", "b/c")):
        _figure(report, "benchmark", f"{name} ({arch})", result.get(key), command, goal=GOALS.get(key))


def _train_stage(stage: str, args, data: dict, report: dict, step) -> None:
    """One training stage (under torchrun for 2+ processes): exit status, img/s and peak GPU memory
    from history.csv."""
    script = {"03": "03_train_age.py", "04": "04_train_fracture_ddp.py", "05": "05_train_boneage.py"}[stage]
    preset = importlib.import_module(Path(script).stem).PRESETS["full"]
    flags = [*data["flags"], "--preset", "full", "--epochs", "2"]
    if args.dry_run:
        flags += ["--arch", DRY_ARCH, "--image-size", "32", "--batch-size", "16", "--workers", "0",
                  "--device", "cpu"]
    else:
        flags += ["--compile", "--device", "cuda"]
    history = data["out"] / {"03": "age", "05": "boneage"}.get(stage, "fracture") / "history.csv"
    if stage == "04":
        flags += ["--projections", data["projection"], "--groups", str(data["group"]),
                  "--bootstrap", "20" if args.dry_run else "100",
                  "--min-epoch-samples", "32" if args.dry_run else "512"]
        history = data["out"] / "fracture" / data["projection"] / f"group{data['group']}" / "history.csv"
    # As run_all.py launches it: torchrun only for 2+ processes (one process forms no process group).
    launcher = [sys.executable] if args.nproc_per_node == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc_per_node)]
    command = [*launcher, script, *flags]
    exit_status = step(stage, command)
    sizes = importlib.import_module("05_train_boneage").BONEAGE_IMAGE_SIZE if stage == "05" else common.IMAGE_SIZE
    size = sizes["full"]
    what = f"{stage} {DRY_ARCH if args.dry_run else preset['arch']} @{32 if args.dry_run else size} px"
    rows = pd.read_csv(history).to_dict("records") if history.is_file() else []
    peak = max((row["peak_gpu_mem_gb"] for row in rows if "peak_gpu_mem_gb" in row), default=None)
    _figure(report, stage, f"{what}: exit status", exit_status, command)
    _figure(report, stage, f"{what}: train img/s, last epoch", rows[-1]["images_per_s"] if rows else None,
            command)
    _figure(report, stage, f"{what}: train img/s, 1st epoch (incl. compiling)",
            rows[0]["images_per_s"] if rows else None, command)
    _figure(report, stage, f"{what}: peak GPU memory, GB", peak, command,
            note="no GPU in a dry run" if args.dry_run else "")


def _benchmark_inference(args, data: dict, work: Path, report: dict, step) -> None:
    """tests/benchmark_predict.py: 07's forward pass for the full preset's fracture model, batch 32."""
    fracture_stage = importlib.import_module("04_train_fracture_ddp")
    arch = DRY_ARCH if args.dry_run else fracture_stage.PRESETS["full"]["arch"]
    size = "32" if args.dry_run else str(common.IMAGE_SIZE["full"])
    result_path = work / "benchmark_predict.json"
    command = [sys.executable, "tests/benchmark_predict.py", "--images", _shown(data["wrist"]),
               "--arch", arch, "--image-size", size, "--batch-size", "32",
               "--device", "cpu" if args.dry_run else "cuda", "--out", _shown(result_path)]
    if args.dry_run:
        command += ["--steps", "2", "--warmup", "1"]
    step("07", command)
    result = common.read_json(result_path) if result_path.is_file() else {}
    what = f"07 {arch} @{size} px, batch 32, {result.get('autocast', 'bf16')}"
    _figure(report, "07", f"{what}: img/s (07's own forward pass)", result.get("infer_img_s"), command)
    _figure(report, "07", f"{what}: img/s with channels_last", result.get("infer_channels_last_img_s"),
            command)
    _figure(report, "07", "07 decode + letterbox, img/s on one CPU core",
            result.get("decode_letterbox_img_s_one_core"), command)
    _figure(report, "07", f"{what}: peak GPU memory, GB", result.get("peak_gpu_mem_gb"), command,
            note="no GPU in a dry run" if args.dry_run else "")


def _run_step(report: dict, name: str, command: list[str], limit: float, logs: Path, out: Path) -> int | None:
    """Run one step in its own process group, stopped (with its children) at `limit` seconds.

    Returns the exit status: 0 = success; anything else (None: stopped or not run) = failure.
    """
    log_path = logs / f"{name.replace(' ', '_')}.log"
    record = {"step": name, "command": _display(command), "time_limit_s": round(limit), "log": _shown(log_path)}
    report["steps"].append(record)
    if limit < 5:
        record.update(exit_status=None, seconds=0.0, result="not run: the time budget is spent")
        common.write_json(report, out)
        return None
    print(f"[{name}] $ {record['command']}", flush=True)
    start = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            code = process.wait(timeout=limit)
            result = "ok" if code == 0 else f"failed (exit status {code})"
        except subprocess.TimeoutExpired:
            code, result = None, f"stopped at its time limit ({limit:.0f} s)"
        finally:
            _stop(process)
    record.update(exit_status=code, seconds=round(time.monotonic() - start, 1), result=result)
    if code != 0:
        record["log_tail"] = log_path.read_text(errors="replace").splitlines()[-15:]
    print(f"[{name}] {result} in {record['seconds']:.0f} s", flush=True)
    common.write_json(report, out)
    return code


def _stop(process: subprocess.Popen) -> None:
    """End the step's whole process group (torchrun and its workers), gently first."""
    if process.poll() is not None:
        with contextlib.suppress(ProcessLookupError):  # a straggler would skew the next step's figures
            os.killpg(process.pid, signal.SIGKILL)
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _figure(report: dict, step: str, name: str, value, command: list[str], goal: float | None = None,
            note: str = "") -> None:
    figure = {"step": step, "figure": name, "value": None if value is None else float(value),
              "gpu": report["environment"]["gpu"], "torch": report["environment"]["torch"],
              "command": _display(command)}
    if goal is not None:
        figure["goal"] = f">= {goal:g}"
        figure["meets_goal"] = None if value is None else bool(value >= goal)
    if note:
        figure["note"] = note
    report["figures"].append(figure)


def _print_table(report: dict, out: Path) -> None:
    env = report["environment"]
    print(f"\nGPU acceptance{' (dry run)' if report['dry_run'] else ''}: {env['gpu']}, torch {env['torch']}, "
          f"{report['wall_s']:.0f} s")
    for step in report["steps"]:
        print(f"  {step['step']:<10} {step['result']} ({step['seconds']:.0f} s)")
    width = max(len(f["figure"]) for f in report["figures"]) if report["figures"] else 0
    for f in report["figures"]:
        value = "-" if f["value"] is None else f"{f['value']:.4g}"
        verdict = {None: "", True: " met", False: " MISSED"}[f.get("meets_goal")]
        goal = f.get("goal", "") + verdict
        print(f"  {f['figure']:<{width}}  {value:>8}  {goal}")
    print(f"commands and details: {_shown(out)}")


def _shown(path: Path) -> str:
    """A path as given to the steps: relative to the project folder when inside it (they run there)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(resolved)


def _display(command: list[str]) -> str:
    """The command as one copyable line, with `python` for this interpreter (no machine's path)."""
    return shlex.join(["python" if part == sys.executable else part for part in command])


if __name__ == "__main__":
    main()
