"""Issue 14's training details: torchvision's focal loss, timm's weight-decay groups, init weights."""
from __future__ import annotations

import pytest
import torch

import common


def _old_focal_formula(logits, targets, alpha, gamma):
    """The hand-written focal loss common.py used before torchvision's replaced it (reference)."""
    targets = targets.float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none")
    p_true = torch.exp(-bce)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * (1 - p_true) ** gamma * bce).mean()


@pytest.mark.parametrize("alpha, gamma", [(0.5, 2.0), (0.25, 2.0), (0.8, 0.0), (0.3, 1.5)])
def test_focal_loss_equals_the_old_formula(alpha, gamma):
    torch.manual_seed(1)
    logits = torch.randn(256) * 3
    targets = (torch.rand(256) > 0.4).float()
    new = common.binary_focal_loss(logits, targets, alpha=alpha, gamma=gamma)
    assert new.item() == pytest.approx(_old_focal_formula(logits, targets, alpha, gamma).item(), rel=1e-5)
    # alpha weights the positives: raising it raises the loss of a batch of hard positives only
    hard_positive = common.binary_focal_loss(torch.tensor([-2.0]), torch.tensor([1.0]), alpha=0.9, gamma=gamma)
    hard_negative = common.binary_focal_loss(torch.tensor([2.0]), torch.tensor([0.0]), alpha=0.9, gamma=gamma)
    assert hard_positive.item() > 8 * hard_negative.item()


def test_focal_loss_negative_alpha_switches_class_weighting_off():
    logits, targets = torch.tensor([-1.0, 1.0, 0.5]), torch.tensor([1.0, 0.0, 1.0])
    unweighted = common.binary_focal_loss(logits, targets, alpha=-1, gamma=2.0)
    # alpha = 0.5 halves every term, so no weighting is exactly twice it
    assert unweighted.item() == pytest.approx(2 * _old_focal_formula(logits, targets, 0.5, 2.0).item(), rel=1e-5)


def _tiny_swin():
    from timm.models.swin_transformer import SwinTransformer
    return SwinTransformer(img_size=32, patch_size=4, in_chans=1, num_classes=1, embed_dim=16,
                           depths=(1, 1), num_heads=(1, 2), window_size=4)


@pytest.mark.parametrize("build", [_tiny_swin, lambda: common.create_model("test_resnet", num_classes=1)])
def test_weight_decay_skips_norms_biases_and_relative_position_tables(build):
    model = build()
    settings = common.TrainSettings(epochs=1, batch_size=2, lr=1e-3, weight_decay=0.05)
    optimizer = common._make_optimizer(model, settings, on_cuda=False)
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    names = dict(model.named_parameters())
    assert set(decay_of) == {id(p) for p in names.values()}  # every parameter is optimised once
    for name, parameter in names.items():
        excluded = (parameter.ndim <= 1 or name.endswith(".bias") or "norm" in name or ".bn" in name
                    or "relative_position_bias_table" in name)
        assert decay_of[id(parameter)] == (0.0 if excluded else 0.05), name
    if "relative_position_bias_table" in " ".join(names):
        tables = [n for n in names if n.endswith("relative_position_bias_table")]
        assert tables and all(names[n].ndim == 2 for n in tables)  # 2-D: the old ndim rule decayed them


def test_weight_decay_exclusions_survive_a_wrapper():
    swin = _tiny_swin()
    wrapper = torch.nn.Sequential()
    wrapper.add_module("backbone", swin)
    names = common.no_weight_decay_names(wrapper)
    assert names and all(n.startswith("backbone.") for n in names)
    assert any("relative_position_bias_table" in n for n in names)


def test_load_init_weights_copies_matching_tensors_and_skips_a_head_of_another_size(tmp_path):
    torch.manual_seed(0)
    source = common.create_model("test_resnet", num_classes=4)
    common.save_checkpoint({"arch": "test_resnet", "state_dict": source.state_dict()}, tmp_path / "best.pt")
    target = common.create_model("test_resnet", num_classes=1)
    common.load_init_weights(target, tmp_path / "best.pt")
    for name, tensor in target.state_dict().items():
        if name.startswith("fc."):
            assert tensor.shape != source.state_dict()[name].shape
        else:
            assert torch.equal(tensor, source.state_dict()[name]), name
    # last.pt keeps its weights under `model`
    common.save_checkpoint({"model": source.state_dict(), "epoch": 1}, tmp_path / "last.pt")
    assert common.load_init_weights(common.create_model("test_resnet", num_classes=4), tmp_path / "last.pt")["epoch"] == 1


def test_load_init_weights_rejects_another_architecture_and_missing_files(tmp_path):
    other = common.create_model("test_convnext", num_classes=1)
    common.save_checkpoint({"arch": "test_convnext", "state_dict": other.state_dict()}, tmp_path / "best.pt")
    with pytest.raises(common.InputError, match="same --arch"):
        common.load_init_weights(common.create_model("test_resnet", num_classes=1), tmp_path / "best.pt")
    with pytest.raises(common.InputError, match="not found"):
        common.load_init_weights(common.create_model("test_resnet", num_classes=1), tmp_path / "nope.pt")
