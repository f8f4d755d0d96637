"""Stage 06: Grad-CAM++ overlays showing where each fracture model looks, on its test images.

For every fracture model 04 trained, the test images it scores (its projection and age group) are
explained with Grad-CAM++ (Chattopadhay et al. 2018) for the fracture logit, computed in fp32 on
the unwrapped model. The map is drawn on the ORIGINAL image (the letterbox padding is cut off and
the map stretched back to the image's own height and width), captioned with the probability, the
model's validation-chosen threshold, the label and the outcome (TP/FP/FN/TN). Errors are shown
first: true positives, false positives and false negatives in turn, then true negatives.

Reads   OUT/fracture/{AP,Lat}/group{g}/best.pt and OUT/fracture/test_predictions.csv (from 04),
        OUT/splits/wrist_test.csv (01: where each test image lies)
Writes  OUT/gradcam/{AP,Lat}/group{g}/<filestem>_p{prob:.2f}_y{label}.png   one overlay per image
        OUT/gradcam/{AP,Lat}/group{g}/grid.png   the first overlays of that model side by side
        OUT/gradcam/index.csv   projection, age_group, filestem, label, prob, threshold, outcome,
                                overlay (path relative to OUT)
        OUT/gradcam/config.json

Run:
  python 06_gradcam.py                                   # demo outputs, 6 images per model
  python 06_gradcam.py --data DATA --preset full         # every test image of every model, GPU
  python 06_gradcam.py --max-per-model 2 --device cpu    # CPU smoke test
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import pandas as pd

import common

MAX_PER_MODEL = {"demo": 6, "full": 0}   # 0 = every test image of the model
MAX_OVERLAY_SIDE = 1024                  # full-size radiographs would make 10 MB PNGs
GRID_TILES = 24
OUTCOME_ORDER = ["TP", "FP", "FN", "TN"]


def parse_args(argv=None):
    parser = common.make_parser(__doc__)
    parser.add_argument("--max-per-model", type=int, default=None,
                        help="overlays per model, errors first; 0 = all (default: 6 in the demo "
                             "preset, all in the full preset)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="images per Grad-CAM++ pass (default: 8)")
    args = common.resolve_common_args(parser.parse_args(argv))
    if args.max_per_model is None:
        args.max_per_model = MAX_PER_MODEL[args.preset]
    if args.max_per_model < 0 or args.batch_size < 1:
        parser.error("--max-per-model must be >= 0 and --batch-size >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    predictions = _read_test_predictions(args.out)
    model_paths = list(fracture_models(args.out / "fracture").values())
    if not model_paths:
        raise common.InputError(f"{args.out / 'fracture'}: no trained fracture model (best.pt); run "
                                "04_train_fracture_ddp.py with the same --out first")
    out_dir = common.ensure_writable_dir(args.out / "gradcam")
    device = common.resolve_device(args.device)
    rows, unreadable = [], 0
    for model_path in model_paths:
        model, checkpoint = common.load_trained_model(model_path, device)
        projection, group = checkpoint["projection"], int(checkpoint["age_group"])
        threshold = float(checkpoint.get("threshold", 0.5))
        chosen = choose_images(_images_of_model(predictions, checkpoint), threshold, args.max_per_model)
        model_dir = out_dir / projection / f"group{group}"
        common.log(f"{projection} group {group}: Grad-CAM++ on {len(chosen)} test images "
                   f"({', '.join(f'{n} {o}' for o, n in chosen['outcome'].value_counts().items())}), "
                   f"threshold {threshold:.2f}")
        tiles = []
        batches = [chosen.iloc[i:i + args.batch_size] for i in range(0, len(chosen), args.batch_size)]
        for batch in common.progress(batches, desc=f"{projection} group {group}", unit="batch"):
            squares, boxes, readable = _load_batch(batch, checkpoint["image_size"])
            unreadable += len(batch) - len(readable)
            if not readable:
                continue
            cams, probs = grad_cam_plus_plus(model, np.stack(squares), device)
            for row, cam, box, prob in zip(readable, cams, boxes, probs):
                # The outcome is re-read from this fp32 pass, so caption, name and colour agree.
                outcome = outcome_of(row.label, prob, threshold)
                overlay = render_overlay(row.image_path, cam, box,
                                         caption(prob, threshold, label=row.label, outcome=outcome))
                path = model_dir / f"{row.filestem}_p{prob:.2f}_y{int(row.label)}.png"
                write_png(overlay, path)
                rows.append({"projection": projection, "age_group": group, "filestem": row.filestem,
                             "label": int(row.label), "prob": float(prob),
                             "threshold": threshold, "outcome": outcome,
                             "overlay": path.relative_to(args.out).as_posix()})
                if len(tiles) < GRID_TILES:
                    tiles.append((_thumbnail(overlay), f"{outcome} p={prob:.3f}"))
        _remove_stale_overlays(model_dir, {args.out / r["overlay"] for r in rows})
        if tiles:
            _save_grid(tiles, model_dir / "grid.png",
                       f"Grad-CAM++ {projection} group {group} (threshold {threshold:.3f})")
        del model
    index = pd.DataFrame(rows, columns=["projection", "age_group", "filestem", "label", "prob",
                                        "threshold", "outcome", "overlay"])
    common.write_csv(index, out_dir / "index.csv")
    common.write_run_config(out_dir, args)
    skipped = f", {unreadable} unreadable image(s) skipped" if unreadable else ""
    common.log(f"Grad-CAM++: {len(index)} overlays from {len(model_paths)} models{skipped} -> {out_dir}")


def _read_test_predictions(out: Path) -> pd.DataFrame:
    """04's test predictions joined with the image paths of 01's test split."""
    path = out / "fracture" / "test_predictions.csv"
    if not path.is_file():
        raise common.InputError(f"{path}: not found; run 04_train_fracture_ddp.py with the same "
                                "--out first")
    predictions = pd.read_csv(path, dtype={"filestem": str})
    test = common.read_split(out, "wrist", "test")[["filestem", "image_path"]]
    return predictions.merge(test, on="filestem", how="inner")


def fracture_models(fracture_dir: Path) -> dict[tuple[str, int], Path]:
    """{(projection, age group): best.pt} of every model 04 trained, AP before Lat, groups in
    order; a group 04 skipped has no best.pt. (07_predict uses this too.)"""
    found = {}
    for projection in common.PROJECTIONS:
        groups = sorted(int(folder.name.removeprefix("group"))
                        for folder in (Path(fracture_dir) / projection).glob("group*")
                        if folder.name.removeprefix("group").isdigit())
        for group in groups:
            path = Path(fracture_dir) / projection / f"group{group}" / "best.pt"
            if path.is_file():
                found[(projection, group)] = path
    return found


def _images_of_model(predictions: pd.DataFrame, checkpoint: dict) -> pd.DataFrame:
    """The test images this model scored: its projection, routed to its age group as in 04."""
    route = checkpoint.get("route", "true")
    group_column = "age_group" if route == "true" else "age_group_pred"
    mine = predictions[(predictions["projection_name"] == checkpoint["projection"])
                       & (predictions[group_column] == checkpoint["age_group"])]
    return mine.rename(columns={f"prob_route_{route}": "prob"}).dropna(subset=["prob"])


def choose_images(frame: pd.DataFrame, threshold: float, limit: int) -> pd.DataFrame:
    """Errors and hits first: TP, FP, FN in turn (most telling first), then TN; `limit` rows (0 = all).

    The most telling image of each kind: the surest TP and FP (highest probability) and the
    clearest miss (lowest probability for a fracture). Interleaving the three kinds keeps a short
    list from being all true positives, which is what a reader of the maps needs to judge.
    """
    frame = frame.copy()
    frame["outcome"] = [outcome_of(y, p, threshold) for y, p in zip(frame["label"], frame["prob"])]
    frame["surety"] = np.where(frame["outcome"].isin(["TP", "FP"]), frame["prob"], -frame["prob"])
    frame = frame.sort_values(["surety", "filestem"], ascending=[False, True])
    frame["rank"] = frame.groupby("outcome").cumcount()
    frame["order"] = frame["outcome"].map(OUTCOME_ORDER.index)
    frame["is_tn"] = frame["outcome"].eq("TN")
    frame = frame.sort_values(["is_tn", "rank", "order"], kind="stable")
    chosen = frame if limit == 0 else frame.head(limit)
    return chosen.drop(columns=["surety", "rank", "order", "is_tn"]).reset_index(drop=True)


def outcome_of(label: int, prob: float, threshold: float) -> str:
    predicted = prob >= threshold
    return ("TP" if predicted else "FN") if int(label) == 1 else ("FP" if predicted else "TN")


def _load_batch(batch: pd.DataFrame, size: int):
    """Preprocess each image exactly as in training; an image that cannot be read is left out."""
    squares, boxes, readable = [], [], []
    for row in batch.itertuples(index=False):
        try:
            square, box = common.preprocess_image(Path(row.image_path), size)
        except (common.ImageReadError, OSError) as error:
            common.log(f"skipped: {error}")
            continue
        squares.append(square)
        boxes.append(box)
        readable.append(row)
    return squares, boxes, readable


def grad_cam_plus_plus(model, squares: np.ndarray, device) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM++ maps of the fracture logit, [B, S, S] in [0, 1], and the fracture probabilities.

    `squares` are uint8 [B, S, S] from common.preprocess_image. The model has ONE logit; the
    target is BinaryClassifierOutputTarget(1), i.e. the logit itself (evidence FOR a fracture),
    for every image whatever its prediction: a false negative then shows what little fracture
    evidence the model found, a false positive what misled it. (ClassifierOutputTarget(0) picks the
    same logit; ClassifierOutputTarget(1) would index past the single output, and the default
    argmax target is meaningless for one logit.) fp32 without autocast: Grad-CAM++ weights use
    gradients cubed, which underflow in bf16.
    """
    import torch
    from pytorch_grad_cam import GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import BinaryClassifierOutputTarget
    model = model.float().eval()
    images = common.prepare_images(torch.from_numpy(np.ascontiguousarray(squares)).unsqueeze(1),
                                   device, train=False, channels_last=False)
    cam = GradCAMPlusPlus(model, target_layers_for(model), reshape_transform=reshape_transform_for(model))
    try:
        # Not `with cam:` -- its __exit__ swallows IndexError and would hide a wrong target layer.
        with torch.enable_grad(), torch.autocast(device.type, enabled=False), \
                layer_norm_statistics_as_constants(model):
            maps = cam(images, targets=[BinaryClassifierOutputTarget(1)] * len(images))
        logits = cam.outputs.detach().float().reshape(len(images), -1)[:, 0]
    finally:
        cam.activations_and_grads.release()
        model.zero_grad(set_to_none=True)
    return maps.astype(np.float32), torch.sigmoid(logits).cpu().numpy()


@contextlib.contextmanager
def layer_norm_statistics_as_constants(model):
    """Within the block, every LayerNorm passes gradients as if its mean and variance were constants.

    The forward values are unchanged. Why: the LayerNorm between the last stage and the logit
    (ConvNeXt's head norm after pooling, Swin's final norm) makes the logit invariant to the scale
    of its input, so the true gradient is orthogonal to the features themselves: for ConvNeXt,
    gradient x activation then sums to exactly zero over the image, and which part of the map
    comes out positive is arbitrary (in our tests, the opposite corner to the evidence about half
    the time). With the statistics held constant the head is linear in the features, each
    position's share of the logit is exact, and the map follows the evidence; this is the "LN
    rule" of Ali et al., ICML 2022. LayerNorms before the target layer do not affect its gradient.
    """
    import torch
    from timm.layers import LayerNorm2d

    def hook(module, inputs, output):
        features = inputs[0]
        # timm's LayerNorm2d normalises channels (dim 1) of NCHW maps; nn.LayerNorm the last dims.
        dims = (1,) if isinstance(module, LayerNorm2d) else tuple(range(-len(module.normalized_shape), 0))
        scale = torch.rsqrt(features.var(dim=dims, keepdim=True, unbiased=False) + module.eps).detach()
        if module.weight is not None:
            weight = module.weight.detach()
            scale = scale * (weight.view(-1, 1, 1) if isinstance(module, LayerNorm2d) else weight)
        # Value: the LayerNorm's own output. Gradient: weight / std, the statistics held fixed.
        return output.detach() + (features - features.detach()) * scale

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def target_layers_for(model) -> list:
    """The last feature stage before pooling, per architecture family (timm models).

    ConvNeXt and ConvNeXtV2 (one timm class): `stages[-1]`, channels-first (B, C, H, W).
    Swin (v1 and v2): `layers[-1]`, whose output is channels-LAST (B, H, W, C): it needs
    `reshape_transform_for(model)`, or the CAM would weigh rows of the map as if they were channels.
    ResNet family (the demo's resnet10t): `layer4[-1]`, the last residual block.
    """
    family = _family(model)
    if family == "convnext":
        return [model.stages[-1]]
    if family == "swin":
        return [model.layers[-1]]
    return [model.layer4[-1]]


def reshape_transform_for(model):
    """None for channels-first families; `to_channels_first` for Swin's channels-last stages."""
    return to_channels_first if _family(model) == "swin" else None


def _family(model) -> str:
    from timm.models.convnext import ConvNeXt
    from timm.models.resnet import ResNet
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.swin_transformer_v2 import SwinTransformerV2
    if isinstance(model, ConvNeXt):
        return "convnext"
    if isinstance(model, (SwinTransformer, SwinTransformerV2)):
        return "swin"
    if isinstance(model, ResNet):
        return "resnet"
    raise common.InputError(f"Grad-CAM++: no target layer known for {type(model).__name__} "
                            f"({getattr(model, 'arch', '?')}); supported: ConvNeXt/ConvNeXtV2, Swin, "
                            "ResNet; add the family to target_layers_for in 06_gradcam.py")


def to_channels_first(tensor):
    """(B, H, W, C) maps or (B, N, C) tokens of a square grid -> (B, C, H, W), as grad-cam expects.

    Token sequences may start with class/register tokens: the N - side**2 leading ones are dropped.
    """
    if tensor.ndim == 3:
        batch, tokens, channels = tensor.shape
        side = math.isqrt(tokens)
        tensor = tensor[:, tokens - side * side:].reshape(batch, side, side, channels)
    if tensor.ndim != 4:
        raise ValueError(f"expected (B, H, W, C) or (B, N, C) features, got shape {tuple(tensor.shape)}")
    return tensor.permute(0, 3, 1, 2)


def caption(prob: float, threshold: float, label: int | None = None, outcome: str | None = None) -> str:
    """'fracture p=0.834 (threshold 0.412) | label 1 | TP'; without a label (07) the prediction.

    Three decimals: near the threshold two would print p=0.55 (threshold 0.55) for a miss.
    """
    text = f"fracture p={prob:.3f} (threshold {threshold:.3f})"
    if label is None:
        return f"{text} | predicted {'fracture' if prob >= threshold else 'no fracture'}"
    return f"{text} | label {int(label)}" + (f" | {outcome}" if outcome else "")


def render_overlay(image_path, cam_square: np.ndarray, box: common.Letterbox, text: str,
                   max_side: int = MAX_OVERLAY_SIDE) -> np.ndarray:
    """RGB uint8: the map on the original image (letterbox undone), with `text` in a banner on top."""
    unit = common.scale_to_unit(common.read_raw_image(Path(image_path)))
    return add_caption(overlay_on_original(unit, cam_square, box, max_side), text)


def overlay_on_original(unit_image: np.ndarray, cam_square: np.ndarray, box: common.Letterbox,
                        max_side: int = MAX_OVERLAY_SIDE) -> np.ndarray:
    """Cut the image region out of the padded-square CAM, resize it to the original height x width
    (shrunk so the longest side is <= max_side), and blend a colour map over the grey image.

    `unit_image` is the original in [0, 1] (common.scale_to_unit), the same pixels the letterbox
    was made from; returns RGB uint8 of the original's shape (or its shrunk copy).
    """
    import cv2
    from pytorch_grad_cam.utils.image import show_cam_on_image
    if unit_image.shape != (box.height, box.width):
        raise ValueError(f"image {unit_image.shape} does not match its letterbox ({box.height}, {box.width})")
    region = cam_square[box.region]
    shrink = min(1.0, max_side / max(box.height, box.width))
    size = (max(1, round(box.width * shrink)), max(1, round(box.height * shrink)))  # cv2: (w, h)
    cam = np.clip(cv2.resize(region.astype(np.float32), size, interpolation=cv2.INTER_LINEAR), 0, 1)
    grey = unit_image if shrink == 1.0 else cv2.resize(unit_image, size, interpolation=cv2.INTER_AREA)
    rgb = np.repeat(np.clip(grey, 0, 1)[..., None], 3, axis=2).astype(np.float32)
    return show_cam_on_image(rgb, cam, use_rgb=True, image_weight=0.6)


def add_caption(rgb: np.ndarray, text: str) -> np.ndarray:
    """A black banner above the image with the caption in white; its ' | ' parts wrap onto more
    lines when one line would be too small to read on a narrow image."""
    import cv2
    font, width = cv2.FONT_HERSHEY_SIMPLEX, rgb.shape[1]
    usable = 0.96 * width
    lines = [text]
    if cv2.getTextSize(text, font, 1.0, 1)[0][0] * 0.5 > usable:
        lines = text.split(" | ")
    widest = max(cv2.getTextSize(line, font, 1.0, 1)[0][0] for line in lines)
    line_h = cv2.getTextSize("Ag", font, 1.0, 1)[0][1]
    scale = min(1.0, usable / widest)
    thickness = 2 if scale > 0.7 else 1
    step = int(line_h * scale * 1.8) + 2
    banner = np.zeros((step * len(lines) + 4, width, 3), dtype=np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(banner, line, (max(2, int(0.02 * width)), step * i + int(step * 0.75) + 2), font,
                    scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return np.concatenate([banner, rgb], axis=0)


def write_png(rgb: np.ndarray, path: Path) -> Path:
    import cv2
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"{path}: PNG encoding failed")
    with common.atomic_path(path) as tmp:
        tmp.write_bytes(encoded.tobytes())
    return Path(path)


def _remove_stale_overlays(model_dir: Path, written: set[Path]) -> None:
    """Delete overlays of an earlier run (other probabilities give other names) so the folder
    holds exactly what index.csv lists."""
    for path in model_dir.glob("*_p*_y*.png"):
        if path not in written:
            path.unlink()


def _thumbnail(rgb: np.ndarray, side: int = 320) -> np.ndarray:
    import cv2
    shrink = min(1.0, side / max(rgb.shape[:2]))
    if shrink == 1.0:
        return rgb
    return cv2.resize(rgb, (round(rgb.shape[1] * shrink), round(rgb.shape[0] * shrink)),
                      interpolation=cv2.INTER_AREA)


def _save_grid(tiles: list[tuple[np.ndarray, str]], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    columns = min(6, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.3 * columns, 3.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, label) in zip(axes.flat, tiles):
        ax.imshow(image)
        ax.set_title(label, fontsize=8)
    fig.suptitle(title, fontsize=10)
    return common.save_figure(fig, path)


if __name__ == "__main__":
    main()
