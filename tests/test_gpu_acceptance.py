"""The GPU acceptance script (tests/gpu_acceptance.py): its CPU dry run, and its per-step time limit.

No GPU is needed: the dry run takes the same steps at toy sizes, so the script cannot rot while
no GPU is around. It runs with pydicom and grad-cam made unimportable, as on the GPU machine.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from conftest import ROOT

import gpu_acceptance


def test_dry_run_gives_every_figure_without_pydicom_or_grad_cam(tmp_path):
    blocked = tmp_path / "blocked"
    for package in ("pydicom", "pytorch_grad_cam"):
        (blocked / package).mkdir(parents=True)
        (blocked / package / "__init__.py").write_text(
            f"raise ImportError('{package} is not installed on the GPU machine')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    out = tmp_path / "results" / "acceptance.json"
    run = subprocess.run([sys.executable, "tests/gpu_acceptance.py", "--dry-run", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    logs = "".join(path.read_text()[-1500:] for path in sorted((tmp_path / "results").glob("*_logs/*.log")))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + logs

    report = json.loads(out.read_text())
    assert [step["step"] for step in report["steps"]] == \
        ["demo data", "01", "02", "benchmark", "03", "04", "05", "07"]
    assert all(step["exit_status"] == 0 for step in report["steps"])
    figures = {figure["figure"]: figure for figure in report["figures"]}
    for figure in figures.values():
        assert figure["gpu"] == "none (CPU dry run)" and figure["torch"] == report["environment"]["torch"]
        assert figure["command"].startswith("python ")
    values = {name: figure["value"] for name, figure in figures.items()}
    for stage, script in (("03", "03_train_age.py"), ("04", "04_train_fracture_ddp.py"),
                          ("05", "05_train_boneage.py")):
        assert values[f"{stage} test_resnet @32 px: exit status"] == 0
        assert values[f"{stage} test_resnet @32 px: train img/s, last epoch"] > 0
        command = figures[f"{stage} test_resnet @32 px: exit status"]["command"]
        assert command.startswith(f"python {script} ")  # one process: no torchrun, as run_all.py does
    bench = {name.split(" (")[0]: value for name, value in values.items()
             if "(test_resnet @32 px, batch 8)" in name}
    assert min(bench.values()) > 0 and len(bench) == 5
    assert abs(bench["b/a"] - bench["(b) project loop from the cache, train img/s"]
               / bench["(a) model-only ceiling, train img/s"]) < 1e-6
    assert figures["b/c (test_resnet @32 px, batch 8)"]["goal"] == ">= 4"
    assert values["07 test_resnet @32 px, batch 32, fp32: img/s (07's own forward pass)"] > 0
    assert "GPU acceptance (dry run)" in run.stdout and "b/a" in run.stdout  # the table
    assert not (tmp_path / "results" / "acceptance_work").exists()  # scratch data removed


def test_a_step_over_its_time_limit_is_stopped_with_its_children_and_recorded(tmp_path):
    """A slow step must not eat the others' time: it and the processes it started are ended,
    and the JSON on disk already says so (a run stopped later keeps it)."""
    child_pid = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; "
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(child_pid)!r}, 'w').write(str(child.pid)); time.sleep(60)")
    report = {"environment": {"gpu": "none", "torch": "x"}, "steps": [], "figures": []}
    out = tmp_path / "acceptance.json"
    started = time.monotonic()
    code = gpu_acceptance._run_step(report, "slow", [sys.executable, "-c", script], 8, tmp_path, out)
    assert code is None and time.monotonic() - started < 30
    written = json.loads(out.read_text())["steps"][0]
    assert written["exit_status"] is None and "time limit" in written["result"]
    pid = int(child_pid.read_text())
    for _ in range(50):  # the killed grandchild is reaped by init shortly after
        if not _alive(pid):
            break
        time.sleep(0.1)
    assert not _alive(pid), "the step's child process outlived the time limit"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"  # a zombie is dead, not yet reaped
    except FileNotFoundError:
        return False


def test_stages_run_as_run_all_launches_them(tmp_path):
    """One process: plain `python STAGE.py`; --nproc-per-node 2: torchrun (and so NCCL on the GPU)."""
    for nproc, start in ((1, ["python", "05_train_boneage.py"]),
                         (2, ["python", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              "05_train_boneage.py"])):
        args = gpu_acceptance.parse_args(["--dry-run", "--nproc-per-node", str(nproc)])
        report = {"environment": {"gpu": "none", "torch": "x"}, "steps": [], "figures": []}
        commands = []
        data = {"flags": ["--out", str(tmp_path)], "out": tmp_path}
        gpu_acceptance._train_stage("05", args, data, report, lambda name, command: commands.append(command))
        assert gpu_acceptance._display(commands[0]).split()[:len(start)] == start
