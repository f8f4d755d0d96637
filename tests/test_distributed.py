"""03 and 04 under torchrun on 2 gloo CPU ranks: DDP partitioning of an uneven global batch,
torchrun's restart and the resume after a crash, 04's pooled start, fail-fast on one rank's error,
two nodes sharing one output folder. (05's launch: test_boneage.py.)"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pandas as pd
import torch

import common
from conftest import ROOT, load_stage
# The small demo's splits (2 test images per cell), shared with the stage tests.
from test_train_stages import FAST, _copy_splits, _run, split_out  # noqa: F401

fracture_stage = load_stage("04_train_fracture_ddp")
FAULT_LAUNCHER = "tests/fault_launcher.py"  # injects the crash or failure the test's environment names


def _torchrun(script: str, flags: list[str], *, env_extra: dict | None = None, nproc: int = 2,
              max_restarts: int = 1, timeout: int = 400) -> subprocess.CompletedProcess:
    """One CPU launch of `script` on `nproc` gloo ranks, through the fault launcher when `env_extra`
    names a fault; torchrun may restart crashed workers."""
    launched = [FAULT_LAUNCHER, script] if env_extra else [script]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               "--max-restarts", str(max_restarts), *launched, *flags]
    return _run(command, {"OMP_NUM_THREADS": "1", **(env_extra or {})}, timeout=timeout)


def _assert_partitioned(audit: dict, world_size: int, shares: list[int]) -> None:
    """Rank 0's record of one epoch: disjoint draws, each rank its share of every global batch."""
    assert audit["world_size"] == world_size and audit["batch_shares"] == shares
    by_rank = audit["indices_by_rank"]
    steps = audit["intended_samples"] // sum(shares)
    assert [len(indices) for indices in by_rank] == [steps * share for share in shares]
    assert sum(len(indices) for indices in by_rank) == audit["intended_samples"]
    # With --sampler none and no cycling an epoch is a permutation: no image is drawn twice.
    assert not set(by_rank[0]) & set(by_rank[1])


def test_04_two_ranks_pooled_start_uneven_batch_crash_restart_and_resume(split_out, tmp_path):
    """ONE torchrun launch, 2 gloo ranks, the demo architecture and its pooled start: an odd global
    batch (15 = 8 + 7) stays exact, rank 0 crashes after the pooled model's epoch 1, torchrun
    restarts both workers, they resume it from last.pt, the age-conditioned model trains, and
    group 2 is then fine-tuned from the pooled best.pt on both ranks; checked from what rank 0 wrote."""
    out, flags = split_out
    run_out = _copy_splits(out, tmp_path / "ddp04")
    launch = _torchrun("04_train_fracture_ddp.py", [
        *flags[:4], "--preset", "demo", "--out", str(run_out), "--image-size", "48", "--device", "cpu",
        "--batch-size", "15", "--projections", "Lat", "--groups", "2", "--epochs", "3", "--patience", "10",
        "--sampler", "none", "--min-epoch-samples", "0", "--bootstrap", "50"],
        env_extra={"PIPELINE_CRASH_AFTER_EPOCH": "1", "PIPELINE_CRASH_RANK": "0", "PIPELINE_CRASH_RUN": "Lat/pooled"})
    logs = launch.stdout + launch.stderr
    assert launch.returncode == 0, logs[-4000:]
    pooled_dir, folder = run_out / "fracture" / "Lat" / "pooled", run_out / "fracture" / "Lat" / "group2"
    conditioned_dir = run_out / "fracture" / "Lat" / "conditioned"  # the age as a second input, on 2 ranks too
    assert logs.count("exits on purpose") == 1, logs[-4000:]  # the pooled model only
    assert f"resuming {pooled_dir} from last.pt after epoch 1" in logs
    train = common.read_split(run_out, "wrist", "train").query("projection_name == 'Lat'")
    for run_dir, n_train in ((pooled_dir, len(train)), (conditioned_dir, len(train)),
                             (folder, int((train["age_group"] == 2).sum()))):
        history = pd.read_csv(run_dir / "history.csv")
        assert history["epoch"].tolist() == [1, 2, 3], run_dir
        assert history["samples_seen"].tolist() == [(n_train // 15) * 15 * k for k in (1, 2, 3)], run_dir
        _assert_partitioned(json.loads((run_dir / "sample_audit.json").read_text()), 2, [8, 7])
    pooled = torch.load(pooled_dir / "best.pt", weights_only=True)
    group = torch.load(folder / "last.pt", weights_only=True)
    assert group["meta"]["init"] == f"pooled:{fracture_stage.weights_fingerprint(pooled['state_dict'])}"
    assert torch.load(folder / "best.pt", weights_only=True)["threshold"] is not None
    assert json.loads((folder / "deployed.json").read_text())["arm"] in {"pooled", "conditioned", "from_pooled", "mean"}
    assert torch.load(conditioned_dir / "best.pt", weights_only=True)["side_input"] == "age"
    assert (run_out / "fracture" / "summary.csv").is_file()  # rank 0 finished after the restart
    assert set(pd.read_csv(run_out / "fracture" / "ablation.csv")["arm"]) == {"pooled", "conditioned", "from_pooled",
                                                                              "mean", "deployed"}


def test_03_two_ranks_swin_crash_restart_and_resume(split_out, tmp_path):
    """The router's full-preset family (Swin) as a tiny member, 2 ranks, crash on rank 1 and resume."""
    out, flags = split_out
    run_out = _copy_splits(out, tmp_path / "ddp03")
    launch = _torchrun("03_train_age.py", [
        *flags[:4], "--preset", "demo", "--out", str(run_out), "--arch", "test_swin", "--image-size", "48",
        "--device", "cpu", "--batch-size", "32", "--epochs", "2", "--patience", "10"],
        env_extra={"PIPELINE_CRASH_AFTER_EPOCH": "1", "PIPELINE_CRASH_RANK": "1"})
    logs = launch.stdout + launch.stderr
    assert launch.returncode == 0, logs[-4000:]
    assert "rank 1 exits on purpose" in logs and "resuming" in logs
    assert pd.read_csv(run_out / "age" / "history.csv")["epoch"].tolist() == [1, 2]
    _assert_partitioned(json.loads((run_out / "age" / "sample_audit.json").read_text()), 2, [16, 16])
    checkpoint = torch.load(run_out / "age" / "best.pt", weights_only=True)
    assert checkpoint["arch"] == "test_swin" and checkpoint["image_size"] == 48
    predictions = pd.read_csv(run_out / "age" / "predictions.csv")
    assert len(predictions) == sum(len(common.read_split(run_out, "wrist", s)) for s in ("train", "val", "test"))


def test_an_error_on_one_rank_ends_the_launch_in_seconds(split_out, tmp_path):
    """Rank 1 fails after its first step while rank 0 waits in the next all-reduce: the launch
    must end within seconds of the error, non-zero, with rank 1's message."""
    out, flags = split_out
    run_out = _copy_splits(out, tmp_path / "fail")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               FAULT_LAUNCHER, "03_train_age.py", *flags[:4], "--preset", "demo", "--out", str(run_out), *FAST,
               "--epochs", "2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PIPELINE_FAIL_RANK": "1"}
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    failed_at, lines = None, []
    for line in process.stdout:
        lines.append(line)
        if failed_at is None and "injected failure on rank 1" in line:
            failed_at = time.monotonic()
    code = process.wait(timeout=120)
    ended = time.monotonic()
    logs = "".join(lines)
    assert code != 0 and failed_at is not None, logs[-3000:]
    assert "[rank 1 of 2]" in logs
    assert ended - failed_at < 15, (ended - failed_at, logs[-3000:])
    assert ended - started < 60, ended - started


def test_two_nodes_share_one_out_and_draw_disjoint_samples(split_out, tmp_path):
    """Two torchrun launchers on this machine as two nodes (c10d rendezvous on 127.0.0.1), one
    shared --out, one model of 04 in the full preset's family (a tiny ConvNeXtV2): the nodes draw
    disjoint samples and the image cache is decoded by one node only."""
    import socket
    out, flags = split_out
    run_out = tmp_path / "nodes"  # the splits without the shared cache: building it once is under test
    shutil.copytree(out / "splits", run_out / "splits")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
         "--local-addr", "127.0.0.1", "04_train_fracture_ddp.py", *flags[:4], "--preset", "demo",
         "--out", str(run_out), "--arch", "test_convnextv2", *FAST, "--projections", "AP",
         "--groups", "2", "--epochs", "2", "--sampler", "none", "--min-epoch-samples", "0",
         "--bootstrap", "50"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    logs = [launcher.communicate(timeout=400)[0] for launcher in launchers]
    assert all(launcher.returncode == 0 for launcher in launchers), logs[0][-3000:] + logs[1][-3000:]
    both = logs[0] + logs[1]
    assert both.count("image cache wrist_48.npy: decoded") == 1, both[-4000:]
    assert both.count("image cache wrist_48.npy: all") == 1, both[-4000:]
    folder = run_out / "fracture" / "AP" / "group2"
    _assert_partitioned(json.loads((folder / "sample_audit.json").read_text()), 2, [8, 8])
    assert pd.read_csv(folder / "history.csv")["epoch"].tolist() == [1, 2]
    assert torch.load(folder / "best.pt", weights_only=True)["arch"] == "test_convnextv2"
    assert (run_out / "fracture" / "summary.csv").is_file()


def test_an_uneven_batch_on_two_ranks_steps_as_one_process(tmp_path):
    """One step on 2 gloo ranks with shares 5 + 4 equals one process's step on the same 9 images:
    each rank's mean loss must count by its share (DDP alone would average the two means)."""
    import one_step_worker
    one_step_worker.one_step(tmp_path / "single.pt", common.DistInfo(0, 1, 0, torch.device("cpu")))
    launch = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "tests/one_step_worker.py", str(tmp_path / "ddp" / "two_ranks.pt")], {"OMP_NUM_THREADS": "1"})
    assert launch.returncode == 0, (launch.stdout + launch.stderr)[-3000:]
    assert json.loads((tmp_path / "ddp" / "run" / "sample_audit.json").read_text())["batch_shares"] == [5, 4]
    single = torch.load(tmp_path / "single.pt", weights_only=True)
    two_ranks = torch.load(tmp_path / "ddp" / "two_ranks.pt", weights_only=True)
    for part in ("gradients", "weights"):
        for name, value in single[part].items():
            torch.testing.assert_close(two_ranks[part][name], value, rtol=1e-5, atol=1e-7,
                                       msg=lambda message: f"{part} {name}: {message}")
