"""Training throughput benchmark: is the GPU fed at the model's own speed? (not part of pytest)

Measures, in ONE run on the same synthetic radiographs and the same model:
  (a) model ceiling    random tensors already on the device, the project's training step
  (b) project loop     common.fit() reading the preprocess-once cache (augmentation on the device)
  (c) original style   fp32, NCHW, no compile, a DataLoader decoding + resizing every 16-bit PNG
                       on every step (the original pipelines' data path)
and prints images/s for each with the ratios b/a and b/c, and writes them to a JSON file.

Run (GPU, the figures in the README):
  python tests/benchmark_train.py --arch convnextv2_tiny --image-size 384 --batch-size 64 \\
      --compile --workers 4 --baseline-workers 14 --out results/benchmark_h100.json
Smoke test on a CPU:
  python tests/benchmark_train.py --arch resnet10t --image-size 64 --batch-size 16 \\
      --n-images 96 --source-size 400x200 --steps 6 --out /tmp/benchmark_cpu.json
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="convnextv2_tiny")
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-images", type=int, default=1024, help="synthetic 16-bit PNGs to write")
    parser.add_argument("--source-size", default="2000x1000", help="HxW of the synthetic PNGs")
    parser.add_argument("--steps", type=int, default=30, help="timed steps for (a) and (c), and steps per epoch of (b)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile, cudnn)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of (b); the first is not counted")
    parser.add_argument("--workers", type=int, default=4, help="loader workers for (b)")
    parser.add_argument("--baseline-workers", type=int, default=4, help="loader workers for (c)")
    parser.add_argument("--compile", action="store_true", help="torch.compile in (a) and (b)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--images", type=Path, help="reuse this folder of PNGs instead of writing new ones")
    parser.add_argument("--out", type=Path, default=Path("results/benchmark.json"))
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    common.import_torch()
    import torch
    info = common.setup_distributed(args.device)
    result = {"device": torch.cuda.get_device_name() if info.device.type == "cuda" else "cpu",
              "arch": args.arch, "image_size": args.image_size, "batch_size": args.batch_size,
              "n_images": args.n_images, "source_size": args.source_size, "compile": args.compile,
              "torch": torch.__version__, "b_loader_workers": args.workers,
              "c_loader_workers": args.baseline_workers}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        paths = _synthetic_pngs(args, scratch)
        cache = common.build_image_cache(paths, args.image_size, scratch / "cache", "bench", workers=None)
        labels = np.arange(len(paths)) % 2
        # Written after each measurement, so a run stopped by a time limit keeps what it measured.
        result["a_model_ceiling_img_s"] = _model_ceiling(args, info)
        common.write_json(result, args.out)
        result["b_project_loop_img_s"] = _project_loop(args, info, cache, paths, labels, scratch)
        result["b_over_a"] = result["b_project_loop_img_s"] / result["a_model_ceiling_img_s"]
        common.write_json(result, args.out)
        result["c_original_style_img_s"] = _original_style(args, info, paths, labels)
        result["b_over_c"] = result["b_project_loop_img_s"] / result["c_original_style_img_s"]
    common.write_json(result, args.out)
    print(json.dumps(result, indent=2))


def _synthetic_pngs(args, scratch: Path) -> list[str]:
    """Realistic-size 16-bit radiograph stand-ins (random texture, full 16-bit range)."""
    import cv2
    if args.images:
        return sorted(str(p) for p in args.images.rglob("*.png"))[: args.n_images]
    height, width = (int(v) for v in args.source_size.split("x"))
    base = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 65535, (height, width)).astype(np.float32),
                            (0, 0), 8)

    def write(i: int) -> str:
        noise = np.random.default_rng(i + 1).normal(0, 800, (height, width)).astype(np.float32)
        path = scratch / f"img{i:05d}.png"
        cv2.imwrite(str(path), np.clip(np.roll(base, i * 37, axis=1) + noise, 0, 65535).astype(np.uint16))
        return str(path)

    # A 2000x1000 16-bit PNG takes ~0.2-0.4 s to compress; OpenCV releases the GIL, so threads
    # write them in parallel and the benchmark does not spend its time budget here.
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(common.progress(pool.map(write, range(args.n_images)), total=args.n_images,
                                    desc="write PNGs"))


def _model_ceiling(args, info) -> float:
    """(a): the same training step on random uint8 batches that already live on the device."""
    import torch
    model = common.create_model(args.arch, num_classes=1).to(info.device)
    on_cuda = info.device.type == "cuda"
    if on_cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=on_cuda)
    step_model = torch.compile(model) if args.compile else model
    batch = torch.randint(0, 256, (args.batch_size, 1, args.image_size, args.image_size),
                          dtype=torch.uint8, device=info.device)
    targets = (torch.arange(args.batch_size, device=info.device) % 2).float()

    def step():
        images = common.prepare_images(batch, info.device, train=True, channels_last=on_cuda)
        with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=on_cuda):
            logits = step_model(images).squeeze(1)
        loss = common.binary_focal_loss(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return _timed(step, args, info)


def _project_loop(args, info, cache, paths, labels, scratch: Path) -> float:
    """(b): common.fit() itself, from the cache; images/s of the epochs after the first."""
    model = common.create_model(args.arch, num_classes=1)
    dataset = common.CachedImageDataset(cache, paths, target=labels.astype(np.float32))
    # Each epoch draws --steps batches (cycling the images), so (b) is timed over as many steps
    # as (a) and (c) however few images were written.
    settings = common.TrainSettings(epochs=args.epochs, batch_size=args.batch_size, lr=1e-4,
                                    patience=args.epochs, workers=args.workers, compile=args.compile,
                                    monitor="auc", min_epoch_samples=args.steps * args.batch_size)
    result = common.fit(model, dataset, labels, forward=lambda m, x, b: m(x).squeeze(1),
                        loss_fn=lambda out, b: common.binary_focal_loss(out, b["target"]),
                        evaluate=lambda m: {"auc": 0.5}, settings=settings, info=info,
                        run_dir=scratch / "fit", checkpoint_meta={"benchmark": True}, balanced=True)
    return float(np.median([row["images_per_s"] for row in result["history"][1:]]))


class _DecodeEveryStep:
    """The original data path: read the 16-bit PNG and squash-resize it on every access."""

    def __init__(self, paths, labels, size):
        self.paths, self.labels, self.size = paths, labels, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        import cv2
        import torch
        image = cv2.imread(self.paths[i], cv2.IMREAD_UNCHANGED).astype(np.float32) / 65535.0
        image = cv2.resize(image, (self.size, self.size), interpolation=cv2.INTER_LINEAR)
        return torch.from_numpy(image).unsqueeze(0), torch.tensor(float(self.labels[i]))


def _original_style(args, info, paths, labels) -> float:
    """(c): fp32, NCHW, no compile, decode + resize in the DataLoader every step."""
    import torch
    model = common.create_model(args.arch, num_classes=1).to(info.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loader = torch.utils.data.DataLoader(_DecodeEveryStep(paths, labels, args.image_size),
                                         batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.baseline_workers,
                                         persistent_workers=args.baseline_workers > 0)
    batches = iter(())

    def step():
        nonlocal batches
        try:
            images, targets = next(batches)
        except StopIteration:
            batches = iter(loader)
            images, targets = next(batches)
        images, targets = images.to(info.device), targets.to(info.device)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(images).squeeze(1), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return _timed(step, args, info)


def _timed(step, args, info) -> float:
    import torch
    for _ in range(args.warmup):
        step()
    if info.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if info.device.type == "cuda":
        torch.cuda.synchronize()
    return args.steps * args.batch_size / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
