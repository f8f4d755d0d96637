"""One optimizer step of common.fit on the same 9 examples, for the loss-weighting test:

    python tests/one_step_worker.py OUT.pt                                     # one process, 9 images
    python -m torch.distributed.run --nproc-per-node 2 tests/one_step_worker.py OUT.pt   # 5 + 4

Rank 0 saves the step's gradient (as every rank holds it after DDP's all-reduce) and the weights
after the step. The model is a linear layer on fixed features, so the augmentation, which differs
per rank, and BatchNorm, whose statistics depend on the batch split, play no part.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

FEATURES = torch.randn(9, 3, generator=torch.Generator().manual_seed(1))
TARGETS = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1], dtype=torch.float32)


class NineExamples(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return len(TARGETS)

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.zeros(1, 2, 2, dtype=torch.uint8), "index": i, "x": FEATURES[i], "target": TARGETS[i]}


def forward(model, images, batch):
    return model(batch["x"].to(images.device))


def loss_fn(outputs, targets):
    return torch.nn.functional.binary_cross_entropy_with_logits(outputs[:, 0], targets["target"])


def one_step(out: Path, info: common.DistInfo) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    gradients = {}

    def keep_gradient(event: str, state: dict) -> None:
        if event == "step":
            gradients.update({name: p.grad.detach().clone() for name, p in state["model"].named_parameters()})

    settings = common.TrainSettings(epochs=1, batch_size=9, lr=0.1, warmup_epochs=0)
    common.fit(model, NineExamples(), TARGETS.long().tolist(), forward=forward, loss_fn=loss_fn,
               evaluate=lambda trained: {"auc": 0.0}, settings=settings, info=info, run_dir=out.parent / "run",
               checkpoint_meta={}, balanced=False, callbacks=[keep_gradient])
    if info.is_main:
        torch.save({"gradients": gradients, "weights": model.state_dict()}, out)


if __name__ == "__main__":
    info = common.setup_distributed("cpu")
    try:
        one_step(Path(sys.argv[1]), info)
    finally:
        common.cleanup_distributed()
