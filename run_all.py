"""Run the whole pipeline, stage by stage, each as a subprocess whose command line is printed.

  demo data (only without --data/--boneage-data) -> 01 test split -> 02 train/val split
  -> 03 age router -> 04 fracture models -> 05 bone age -> 06 Grad-CAM++ -> 08 outputs/REPORT.md

Two independent tracks: wrist (01, 02, 03, 04, 06) runs when --data is given, bone age (01, 02,
05) when --boneage-data is given; with neither, the demo runs both.

03, 04 and 05 run under `python -m torch.distributed.run` (torchrun) with --nproc-per-node
processes (default: the number of visible GPUs, 1 on CPU); multi-node flags pass through. One
process on one node without --max-restarts runs as plain `python STAGE.py`, the same run.

A stage is skipped when its outputs are complete and its inputs and settings are unchanged since
it last finished (OUT/manifests/<stage>.json records a hash of both); --force reruns. A run that
was interrupted (Ctrl-C, a killed process) resumes when rerun with the same command: finished
stages are skipped and a training stage continues from its last.pt, provided its code, data and
settings are unchanged (otherwise it trains from scratch; --force also makes 03/04/05 retrain).

Run:
  python run_all.py                                   # the demo, end to end, on a CPU
  python run_all.py --data GRAZPEDWRI --boneage-data RSNA --pretrained-dir WEIGHTS   # full preset
  python run_all.py --data GRAZPEDWRI                 # the wrist track alone
  python run_all.py --boneage-data RSNA               # the bone-age track alone
  python run_all.py --only 04 --extra "04=--loss bce --sampler none"   # one stage, extra flags
  python run_all.py --nnodes 2 --node-rank 0 --rdzv-endpoint host0:29500 --data ...   # 2 nodes
"""
from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import common


@dataclass
class Stage:
    name: str
    script: str
    distributed: bool = False
    # Files under OUT it reads, and files under OUT that mean "done", per track ("wrist",
    # "boneage"): the split stages serve both tracks, the others one.
    inputs: dict[str, list[str]] = field(default_factory=dict)
    outputs: dict[str, list[str]] = field(default_factory=dict)


STAGES = [
    Stage("01", "01_split_test.py",
          outputs={"wrist": ["splits/wrist_test.csv", "splits/age_groups.json"],
                   "boneage": ["splits/boneage_test.csv"]}),
    Stage("02", "02_split_trainval.py",
          inputs={"wrist": ["splits/wrist_test.csv"], "boneage": ["splits/boneage_test.csv"]},
          outputs={"wrist": ["splits/wrist_train.csv", "splits/wrist_val.csv", "splits/split_report.md"],
                   "boneage": ["splits/boneage_train.csv", "splits/boneage_val.csv", "splits/split_report.md"]}),
    Stage("03", "03_train_age.py", distributed=True,
          inputs={"wrist": ["splits/wrist_train.csv", "splits/wrist_val.csv", "splits/wrist_test.csv"]},
          outputs={"wrist": ["age/best.pt", "age/predictions.csv", "age/metrics.json"]}),
    Stage("04", "04_train_fracture_ddp.py", distributed=True,
          inputs={"wrist": ["splits/wrist_train.csv", "splits/wrist_val.csv", "splits/wrist_test.csv",
                            "age/predictions.csv"]},
          outputs={"wrist": ["fracture/summary.csv", "fracture/test_predictions.csv"]}),
    Stage("05", "05_train_boneage.py", distributed=True,
          inputs={"boneage": ["splits/boneage_train.csv", "splits/boneage_val.csv", "splits/boneage_test.csv"]},
          outputs={"boneage": ["boneage/best.pt", "boneage/metrics.json", "boneage/predictions.csv"]}),
    Stage("06", "06_gradcam.py", inputs={"wrist": ["fracture/summary.csv", "fracture/test_predictions.csv"]},
          outputs={"wrist": ["gradcam/index.csv"]}),
    # The report reads every track's metrics and the manifests (the commands that ran), so it is
    # rewritten whenever a stage before it reran.
    Stage("08", "08_report.py",
          inputs={"wrist": ["age/metrics.json", "fracture/summary.csv", "fracture/operating_points.csv",
                            "gradcam/index.csv", "manifests/03.json", "manifests/04.json", "manifests/06.json"],
                  "boneage": ["boneage/metrics.json", "manifests/05.json"]},
          outputs={"wrist": ["REPORT.md"], "boneage": ["REPORT.md"]}),
]
STAGE_NAMES = [stage.name for stage in STAGES]
PRETRAINED_FILES = {"03": "age", "04": "fracture", "05": "boneage"}


def parse_args(argv=None):
    parser = common.make_parser(__doc__)
    parser.add_argument("--from", dest="first", choices=STAGE_NAMES, help="start at this stage")
    parser.add_argument("--to", dest="last", choices=STAGE_NAMES, help="stop after this stage")
    parser.add_argument("--only", choices=STAGE_NAMES, help="run just this stage")
    parser.add_argument("--force", action="store_true", help="rerun stages even if up to date")
    parser.add_argument("--extra", action="append", default=[], metavar="STAGE=FLAGS",
                        help='extra flags for one stage, e.g. "04=--epochs 5 --compile" (repeatable)')
    parser.add_argument("--pretrained-dir", type=Path,
                        help="folder with age.*, fracture.*, boneage.* weight files for 03/04/05")
    distributed = parser.add_argument_group("torchrun (stages 03, 04, 05)")
    distributed.add_argument("--nproc-per-node", type=int, help="processes per node "
                             "(default: visible GPUs, or 1 on CPU)")
    distributed.add_argument("--nnodes", type=int, default=1, help="number of nodes (default: 1)")
    distributed.add_argument("--node-rank", type=int, default=0, help="this node's rank (default: 0)")
    distributed.add_argument("--rdzv-endpoint", help="HOST:PORT of the rendezvous (multi-node)")
    distributed.add_argument("--max-restarts", type=int, default=0,
                             help="let torchrun restart crashed workers; they resume from last.pt")
    args = parser.parse_args(argv)
    args.on_demo = args.data is None and args.boneage_data is None
    common.resolve_common_args(args)
    args.tracks = [track for track, data in (("wrist", args.data), ("boneage", args.boneage_data))
                   if data is not None]
    args.extra = _parse_extra(parser, args.extra)
    if args.nnodes > 1 and not args.rdzv_endpoint:
        parser.error("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
    return args


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    common.ensure_writable_dir(args.out)
    if args.device != "cpu":  # (the CPU needs no check, and run_all then needs no torch: ~3 s)
        common.resolve_device(args.device)  # `--device cuda` without a GPU: one line now, not after 01/02
    commands = []
    if args.on_demo and not (args.only or args.first):
        commands.append(_run([sys.executable, "data/make_demo.py"], "demo data"))
    for track, flag, stages in (("wrist", "--data", "03, 04, 06"), ("boneage", "--boneage-data", "05")):
        if track not in args.tracks:
            name = "bone age" if track == "boneage" else "the wrist track"
            print(f"{name} ({stages}) skipped: no {flag} given", flush=True)
    for stage in _selected(args):
        command = _command(stage, args)
        manifest = args.out / "manifests" / f"{stage.name}.json"
        fingerprint = _fingerprint(stage, command, args)
        if not args.force and _up_to_date(stage, manifest, fingerprint, args.out, args.tracks):
            print(f"[{stage.name}] up to date, skipped (--force reruns it)", flush=True)
            commands.append(shlex.join(command))
            continue
        commands.append(_run(command, f"stage {stage.name}"))
        common.write_json({"fingerprint": fingerprint, "command": shlex.join(command),
                           "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, manifest)
    report = args.out / "REPORT.md"  # written by the last stage, 08_report.py
    print(f"done in {time.perf_counter() - started:.0f} s; read {report}", flush=True)


def _parse_extra(parser, items: list[str]) -> dict[str, list[str]]:
    extra: dict[str, list[str]] = {}
    for item in items:
        name, _, flags = item.partition("=")
        if name not in STAGE_NAMES or not flags:
            parser.error(f'--extra {item!r}: write it as STAGE=FLAGS, e.g. "04=--epochs 5"')
        extra.setdefault(name, []).extend(shlex.split(flags))
    return extra


def _selected(args) -> list[Stage]:
    """The stages asked for (--only/--from/--to) that serve a track whose data was given."""
    if args.only:
        chosen = [s for s in STAGES if s.name == args.only]
    else:
        first = STAGE_NAMES.index(args.first) if args.first else 0
        last = STAGE_NAMES.index(args.last) if args.last else len(STAGES) - 1
        chosen = STAGES[first:last + 1]
    return [stage for stage in chosen if set(stage.outputs) & set(args.tracks)]


def _command(stage: Stage, args) -> list[str]:
    """The exact command line for one stage (printed, so it can be copied and rerun by hand)."""
    flags = ["--out", str(args.out), "--preset", args.preset, "--device", args.device,
             "--seed", str(args.seed)]
    if not args.on_demo:
        for flag, data in (("--data", args.data), ("--boneage-data", args.boneage_data)):
            if data is not None:
                flags += [flag, str(data)]
    if args.force and stage.distributed:
        flags += ["--force"]  # retrain from scratch, not resume a finished last.pt
    if args.pretrained_dir and stage.name in PRETRAINED_FILES:
        flags += ["--pretrained", str(_pretrained_file(args.pretrained_dir, PRETRAINED_FILES[stage.name]))]
    flags += args.extra.get(stage.name, [])
    script = stage.script  # stages run with the project folder as working directory
    nproc = args.nproc_per_node or _visible_gpus(args.device) or 1
    if not stage.distributed or (nproc == 1 and args.nnodes == 1 and not args.max_restarts):
        # One process: torchrun would only add a launcher (~4 s of start-up here) around the same
        # run, since a stage with WORLD_SIZE 1 forms no process group either way.
        return [sys.executable, script, *flags]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--max-restarts", str(args.max_restarts)]
    if args.nnodes > 1:
        launcher += ["--nnodes", str(args.nnodes), "--node-rank", str(args.node_rank),
                     "--rdzv-backend", "c10d", "--rdzv-endpoint", args.rdzv_endpoint]
    else:
        launcher += ["--standalone"]  # a free local port: two runs on one machine do not collide
    return [*launcher, script, *flags]


def _visible_gpus(device: str) -> int:
    if device == "cpu":
        return 0
    import torch
    return torch.cuda.device_count()


def _pretrained_file(folder: Path, stem: str) -> Path:
    matches = sorted(p for p in Path(folder).glob(f"{stem}.*") if p.suffix in (".safetensors", ".pth", ".bin", ".pt"))
    if not matches:
        raise common.InputError(f"{folder}: no {stem}.safetensors/.pth weights file for this stage; "
                                "name the files age.*, fracture.*, boneage.*")
    return matches[0]


def _fingerprint(stage: Stage, command: list[str], args) -> str:
    """Hash of the stage's command-line settings, its inputs' contents and its code."""
    digest = hashlib.sha256()
    # --force is how a stage was run, not what it makes: a forced run leaves the stage up to date.
    # Where the output folder lies is not a setting: a run folder copied or moved elsewhere is
    # still up to date, so its inputs are named relative to it.
    settings = ["<out>" if c == str(args.out) else c for c in command
                if not c.startswith("--standalone") and c != "--force"]
    digest.update(json.dumps(settings[settings.index(stage.script):]).encode())
    sources = [args.out / name for track in args.tracks for name in stage.inputs.get(track, [])]
    if stage.name == "01":
        if args.data is not None:
            # A hospital table is the CSV itself (its images are hashed by the cache, not here).
            sources.append(args.data if common.is_hospital_table(args.data) else args.data / "dataset.csv")
        if args.boneage_data is not None:
            sources.append(common.find_boneage_csv(args.boneage_data))
    for path in [*sources, common.ROOT / stage.script, common.ROOT / "common.py"]:
        digest.update(_where(path, args.out).encode())
        digest.update(path.read_bytes() if path.is_file() else b"<missing>")
    return digest.hexdigest()


def _where(path: Path, out: Path) -> str:
    """A source's name for the fingerprint: relative to the run folder or the code folder, so a
    moved run or checkout stays up to date (the contents are hashed beside it)."""
    for base in (out, common.ROOT):
        if path.is_relative_to(base):
            return path.relative_to(base).as_posix()
    return str(path)


def _up_to_date(stage: Stage, manifest: Path, fingerprint: str, out: Path, tracks: list[str]) -> bool:
    outputs = [name for track in tracks for name in stage.outputs.get(track, [])]
    if not manifest.is_file() or not all((out / name).is_file() for name in outputs):
        return False
    return common.read_json(manifest).get("fingerprint") == fingerprint


def _run(command: list[str], label: str) -> str:
    line = shlex.join(command)
    print(f"\n[{label}] $ {line}", flush=True)
    started = time.perf_counter()
    try:
        process = subprocess.Popen(command, cwd=common.ROOT, stderr=subprocess.PIPE, text=True, bufsize=1)
        _relay_stderr(process.stderr)
        code = process.wait()
    except KeyboardInterrupt:
        sys.exit(f"\ninterrupted during {label}; rerun the same command to resume")
    if code != 0:
        sys.exit(f"error: {label} failed (exit status {code}); fix the problem it reported above, "
                 "then rerun the same command: finished stages are skipped and training resumes")
    print(f"[{label}] finished in {time.perf_counter() - started:.0f} s", flush=True)
    return line


def _relay_stderr(stream) -> None:
    """Pass a stage's stderr through, minus torchrun's own traceback when a worker fails.

    The worker has already printed its one-line error; the launcher then adds a traceback of
    torch/distributed/run.py and a failure box that only repeat it. A traceback from the stage's
    own code (a real bug) is always shown.
    """
    block: list[str] = []
    launcher_failed = False
    for line in stream:
        if launcher_failed:
            continue
        if block:
            block.append(line)
            if not line.startswith((" ", "\t")):  # the exception line closes a traceback
                if any("torch/distributed/run.py" in entry or "elastic" in entry for entry in block):
                    launcher_failed = True
                else:
                    sys.stderr.write("".join(block))
                block = []
        elif line.startswith("Traceback (most recent call last):"):
            block = [line]
        elif "torch/distributed/elastic" not in line:
            sys.stderr.write(line)
        sys.stderr.flush()
    if block:
        sys.stderr.write("".join(block))


if __name__ == "__main__":
    main()
