"""Run a stage with a fault injected into common.fit: the restart and fail-fast tests' launcher.

    python tests/fault_launcher.py STAGE.py [stage flags]
    python -m torch.distributed.run --nproc-per-node 2 tests/fault_launcher.py STAGE.py [stage flags]

The fault comes from the test's environment, never from the production code:
    PIPELINE_CRASH_AFTER_EPOCH=N   rank PIPELINE_CRASH_RANK (default 0) exits with code 17 once epoch
                                   N's last.pt is written, in every model or only in the one whose
                                   folder ends with PIPELINE_CRASH_RUN (e.g. "Lat/pooled")
    PIPELINE_FAIL_RANK=r           rank r raises after its first optimizer step, while the others
                                   wait in the next step's all-reduce
"""
from __future__ import annotations

import functools
import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def crash_after_epoch(event: str, state: dict) -> None:
    crash_epoch = int(os.environ.get("PIPELINE_CRASH_AFTER_EPOCH", "0"))
    if event != "epoch" or state["epoch"] != crash_epoch:
        return
    if not Path(state["run_dir"]).as_posix().endswith(os.environ.get("PIPELINE_CRASH_RUN", "")):
        return
    import common
    common.barrier()  # rank 0 has written last.pt before any rank leaves
    if state["rank"] == int(os.environ.get("PIPELINE_CRASH_RANK", "0")):
        print(f"PIPELINE_CRASH_AFTER_EPOCH={crash_epoch}: rank {state['rank']} exits on purpose to test resume",
              flush=True)
        os._exit(17)


def fail_on_rank(event: str, state: dict) -> None:
    if event == "step" and state["rank"] == int(os.environ.get("PIPELINE_FAIL_RANK", "-1")):
        raise RuntimeError(f"PIPELINE_FAIL_RANK={state['rank']}: injected failure on rank {state['rank']}")


def main() -> None:
    stage, *flags = sys.argv[1:]
    sys.path.insert(0, str(ROOT))
    import common
    # The stage calls common.fit by attribute, so it finds this one with the faults bound in.
    common.fit = functools.partial(common.fit, callbacks=[crash_after_epoch, fail_on_rank])
    sys.argv = [str(ROOT / stage), *flags]
    runpy.run_path(str(ROOT / stage), run_name="__main__")


if __name__ == "__main__":
    main()
