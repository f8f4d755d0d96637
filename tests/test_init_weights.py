"""common.load_init_weights and --init-from: fine-tuning a hospital model from a trained run."""
from __future__ import annotations

import pytest
import torch

import common


def _checkpoint(tmp_path, model, name="best.pt", key="state_dict", arch="test_resnet"):
    path = tmp_path / name
    common.save_checkpoint({key: model.state_dict(), "arch": arch, "kind": "classifier"}, path)
    return path


def test_matching_tensors_are_copied_and_a_head_of_another_size_is_skipped(tmp_path, capsys):
    torch.manual_seed(0)
    router = common.create_model("test_resnet", num_classes=4)           # 4 age groups
    torch.manual_seed(1)
    fracture = common.create_model("test_resnet", num_classes=1)         # 1 logit
    head_before = fracture.get_classifier().weight.detach().clone()
    for key, name in (("state_dict", "best.pt"), ("model", "last.pt")):
        checkpoint = common.load_init_weights(fracture, _checkpoint(tmp_path, router, name, key))
        assert checkpoint["arch"] == "test_resnet"
        own, source = fracture.state_dict(), router.state_dict()
        body = [n for n in own if not n.startswith("fc.")]
        assert body and all(torch.equal(own[n], source[n]) for n in body)
        assert torch.equal(fracture.get_classifier().weight, head_before)  # the head starts fresh
    assert "kept fresh (shape or name differs): fc.bias, fc.weight" in capsys.readouterr().out


def test_another_architecture_or_a_bad_file_is_one_line_error(tmp_path):
    other = common.create_model("test_efficientnet", num_classes=1)
    target = common.create_model("test_resnet", num_classes=1)
    with pytest.raises(common.InputError, match="tensors match by name and shape.*--arch test_efficientnet"):
        common.load_init_weights(target, _checkpoint(tmp_path, other, arch="test_efficientnet"))
    with pytest.raises(common.InputError, match="checkpoint not found"):
        common.load_init_weights(target, tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(common.InputError, match="cannot load the checkpoint"):
        common.load_init_weights(target, tmp_path / "junk.pt")
    common.save_checkpoint({"arch": "test_resnet"}, tmp_path / "empty.pt")
    with pytest.raises(common.InputError, match="no model weights"):
        common.load_init_weights(target, tmp_path / "empty.pt")
