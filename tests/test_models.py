import json
import socket

import pytest
import torch

from dfkd.errors import DfkdError
from dfkd.models import build_model
from dfkd.models.checkpoint import load_checkpoint_into, read_state_dict, save_model


def test_checkpoint_layouts_load(tmp_path):
    src = build_model("resnet20_cifar", num_classes=10)
    sd = src.state_dict()
    layouts = {
        "plain.pt": sd,
        "nested.th": {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "best_prec1": 91.0},
        "compiled.pth": {"model": {f"_orig_mod.{k}": v for k, v in sd.items()}},
    }
    for name, obj in layouts.items():
        torch.save(obj, tmp_path / name)
    save_model(src, tmp_path / "w.safetensors", build={"model": "resnet20_cifar"})
    x = torch.randn(2, 3, 32, 32)
    src.eval()
    fresh = build_model("resnet20_cifar", num_classes=10).eval()  # what a load that did nothing gives
    assert not torch.allclose(fresh(x), src(x), atol=1e-3)
    for name in [*layouts, "w.safetensors"]:
        dst = build_model("resnet20_cifar", num_classes=10, checkpoint=tmp_path / name).eval()
        assert torch.allclose(dst(x), src(x), atol=1e-6), name
    assert json.loads((tmp_path / "w.json").read_text()) == {"model": "resnet20_cifar"}


def test_checkpoint_errors(tmp_path):
    with pytest.raises(DfkdError, match="checkpoint not found"):
        read_state_dict(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DfkdError, match="cannot read checkpoint"):
        read_state_dict(tmp_path / "junk.pt")
    torch.save(build_model("resnet20_cifar", num_classes=10).state_dict(), tmp_path / "r20.pt")
    with pytest.raises(DfkdError, match="does not fit the model.*shape mismatch"):
        load_checkpoint_into(build_model("resnet20_cifar", num_classes=100), tmp_path / "r20.pt")
    with pytest.raises(DfkdError, match="missing key"):
        load_checkpoint_into(build_model("resnet32_cifar", num_classes=10), tmp_path / "r20.pt")


def test_unknown_model_lists_close_matches():
    with pytest.raises(DfkdError, match=r"unknown model 'resnet56_cifra'.*resnet56_cifar"):
        build_model("resnet56_cifra")
    with pytest.raises(DfkdError, match=r"vit_tiny_patch16_224"):
        build_model("vit_tiny_patch16_22")


def test_timm_model_never_downloads(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    kw = dict(pretrained=True, img_size=16, patch_size=8, num_classes=3, depth=1, embed_dim=24, num_heads=2)
    torch.manual_seed(0)
    a = build_model("vit_tiny_patch16_224", **kw)
    torch.manual_seed(1)
    b = build_model("vit_tiny_patch16_224", **kw)
    assert a(torch.rand(1, 3, 16, 16)).shape == (1, 3)
    # no weights came from anywhere: the two builds are their seeds' random initialisations
    assert not torch.equal(a.patch_embed.proj.weight, b.patch_embed.proj.weight)


@pytest.mark.parametrize("name,params", [("resnet20_cifar", 0.27e6), ("resnet56_cifar", 0.85e6),
                                         ("resnet18_cifar", 11.17e6), ("wrn16_2", 0.69e6), ("wrn40_2", 2.2e6)])
def test_cifar_model_sizes(name, params):
    """Parameter counts as published (He et al. 2016; Zagoruyko & Komodakis 2016)."""
    m = build_model(name)
    n = sum(p.numel() for p in m.parameters())
    assert abs(n - params) / params < 0.02
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 10)
