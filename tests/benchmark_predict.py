"""Inference throughput of 07_predict: radiographs a second one fracture model scores (not part of pytest)

Times the call 07_predict.py makes for each batch (its `_infer`: host-to-device copy, normalising,
bf16 autocast on CUDA, fp32 on CPU) on --batch-size real radiographs preprocessed exactly as 07
does (common.preprocess_image, letterboxed to --image-size). The model is --arch in eval mode with
random weights: speed does not depend on the weights, so no trained checkpoint is needed. Also
reported: the same call with the model in channels_last too (07 converts only the batch), and
how many images a second one CPU core decodes and letterboxes (07 does that in its own process
before each batch).

Run (GPU, the full preset's fracture model):
  python tests/benchmark_predict.py --images data/demo/grazpedwri --arch convnextv2_large \\
      --image-size 384 --batch-size 32 --out results/benchmark_predict.json
Smoke test on a CPU:
  python tests/benchmark_predict.py --images data/demo/grazpedwri --arch test_resnet \\
      --image-size 32 --steps 2 --warmup 1 --device cpu --out /tmp/benchmark_predict.json
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="folder of radiographs (PNG) to score")
    parser.add_argument("--arch", default="convnextv2_large", help="timm architecture (default: convnextv2_large)")
    parser.add_argument("--image-size", type=int, default=384, help="model input size (default: 384)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--steps", type=int, default=20, help="timed batches (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first (default: 3)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--out", type=Path, default=Path("results/benchmark_predict.json"))
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    common.import_torch()
    import torch
    predict_stage = importlib.import_module("07_predict")
    device = common.resolve_device(args.device)
    squares, decode_img_s = _preprocessed_batch(args)
    model = common.create_model(args.arch, num_classes=1, image_size=args.image_size).to(device).eval()
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "arch": args.arch, "image_size": args.image_size,
              "batch_size": args.batch_size, "autocast": "bf16" if device.type == "cuda" else "fp32",
              "decode_letterbox_img_s_one_core": decode_img_s}
    result["infer_img_s"] = _timed(lambda: predict_stage._infer(model, squares, device), args, device)
    common.write_json(result, args.out)  # kept if the channels_last run below fails
    result["infer_channels_last_img_s"] = _timed_channels_last(model, squares, device, args)
    if device.type == "cuda":
        result["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    common.write_json(result, args.out)
    print(json.dumps(result, indent=2))


def _preprocessed_batch(args) -> tuple[np.ndarray, float]:
    """One batch of uint8 squares from real files, and the one-core decode + letterbox rate."""
    paths = sorted(args.images.rglob("*.png"))[: args.batch_size]
    if not paths:
        raise common.InputError(f"{args.images}: no PNG radiographs found; pass --images with a folder "
                                "of them (e.g. data/demo/grazpedwri after data/make_demo.py)")
    start = time.perf_counter()
    squares = [common.preprocess_image(path, args.image_size)[0] for path in paths]
    decode_img_s = len(paths) / (time.perf_counter() - start)
    # Fewer files than a batch: repeat them, the model's speed does not depend on the pixels.
    squares = [squares[i % len(squares)] for i in range(args.batch_size)]
    return np.stack(squares), decode_img_s


def _timed_channels_last(model, squares: np.ndarray, device, args) -> float:
    """07's forward pass with the model in channels_last as well as the batch (as in training)."""
    import torch
    model = model.to(memory_format=torch.channels_last)

    def step():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                    enabled=device.type == "cuda"):
            batch = common.prepare_images(torch.from_numpy(squares).unsqueeze(1), device, train=False,
                                          channels_last=True)
            return model(batch).float().cpu()

    return _timed(step, args, device)


def _timed(step, args, device) -> float:
    """Images/s over --steps calls after --warmup; each call ends with the outputs on the CPU."""
    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    return args.steps * args.batch_size / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
