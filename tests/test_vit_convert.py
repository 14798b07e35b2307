"""nn.MultiheadAttention ViT -> timm VisionTransformer conversion (dfkd.models.convert)."""

import json

import numpy as np
import pytest
import torch

from dfkd.errors import DfkdError
from dfkd.models import build_model
from dfkd.models.checkpoint import read_state_dict
from dfkd.models.convert import (EncoderViT, MHAViT, apply_norm_eps, build_converted, convert_mha_vit, main)
from tests.conftest import shared_data

pytestmark = pytest.mark.usefixtures("one_thread")

ASHU = "teachers/vit_cifar10_ashu/vit_model.pth"


def _randomize(model, seed=0):
    """Perturb every parameter (LayerNorms included: at init all norms are alike, and a converter that
    swapped them would pass)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def _same_logits(ref, state, num_heads, x, **kw):
    """Convert ``state``, build the timm ViT and compare with ``ref`` in float64 (exact up to rounding)
    and float32 (the dtype the models run in)."""
    kwargs, timm_state = convert_mha_vit(state, num_heads=num_heads, **kw)
    model = build_converted(kwargs, timm_state)
    ref = ref.eval()
    with torch.no_grad():
        a32, b32 = model(x), ref(x)
        a64, b64 = model.double()(x.double()), ref.double()(x.double())
    ref.float()
    assert torch.allclose(a64, b64, atol=1e-5, rtol=0), (a64 - b64).abs().max()
    assert torch.allclose(a32, b32, atol=1e-4, rtol=1e-5), (a32 - b32).abs().max()
    return kwargs, timm_state


def test_tiny_mha_vit_converts_to_the_same_function():
    torch.manual_seed(0)
    ref = _randomize(MHAViT(img_size=8, patch=2, dim=16, depth=3, heads=2, mlp_ratio=2.0, num_classes=5))
    kwargs, _ = _same_logits(ref, ref.state_dict(), 2, torch.rand(6, 3, 8, 8))
    assert kwargs == dict(img_size=8, patch_size=2, in_chans=3, num_classes=5, embed_dim=16, depth=3,
                          num_heads=2, mlp_ratio=2.0, qkv_bias=True, proj_bias=True, class_token=True,
                          global_pool="token", no_embed_class=False, final_norm=True, act_layer="gelu")


def test_wrong_head_count_is_a_different_function():
    """The test above can fail: the same weights read with another head count give other logits."""
    torch.manual_seed(0)
    ref = _randomize(MHAViT(img_size=8, patch=2, dim=16, depth=2, heads=2, num_classes=5)).eval()
    kwargs, st = convert_mha_vit(ref.state_dict(), num_heads=4)
    x = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        assert (build_converted(kwargs, st)(x) - ref(x)).abs().max() > 1e-3


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_transformer_encoder_layout_converts(activation):
    torch.manual_seed(1)
    ref = _randomize(EncoderViT(activation=activation, norm_first=True))
    kwargs, _ = _same_logits(ref, ref.state_dict(), 2, torch.rand(4, 3, 8, 8), act_layer=activation)
    assert kwargs["act_layer"] == activation and kwargs["depth"] == 2


def test_key_name_variants():
    """torchvision-style names (encoder_layer_<i>, self_attention, ln_1/ln_2, mlp.0/mlp.3, heads.head)."""
    torch.manual_seed(2)
    ref = _randomize(MHAViT(img_size=8, patch=2, dim=16, depth=2, heads=2, num_classes=3))
    rename = {"patch_embedding.embed": "conv_proj", "transformer_layers.": "encoder.layers.encoder_layer_",
              "attention": "self_attention", "norm1": "ln_1", "norm2": "ln_2", "mlp.2": "mlp.3",
              "out_head.0": "encoder.ln", "out_head.1": "heads.head", "pos_embed": "pos_embedding",
              "cls_token": "class_token"}
    state = {}
    for k, v in ref.state_dict().items():
        for a, b in rename.items():
            k = k.replace(a, b)
        state[k] = v
    assert "encoder.layers.encoder_layer_1.self_attention.in_proj_weight" in state
    _same_logits(ref, state, 2, torch.rand(4, 3, 8, 8))


def test_one_line_errors():
    torch.manual_seed(0)
    st = MHAViT(img_size=8, patch=2, dim=16, depth=2, heads=2, num_classes=5).state_dict()
    bad_extra = {**st, "extra.weight": torch.zeros(7, 7)}
    no_norm = {k: v for k, v in st.items() if k != "transformer_layers.1.norm2.weight"}
    no_cls = {k: v for k, v in st.items() if k != "cls_token"}
    cases = [((st,), {}, "num_heads"), ((st,), {"num_heads": 3}, "does not divide"),
             ((st,), {"num_heads": 2, "norm_first": False}, "post-norm"),
             ((build_model("resnet20_cifar").state_dict(),), {"num_heads": 2}, "in_proj_weight"),
             ((bad_extra,), {"num_heads": 2}, "extra"), ((no_norm,), {"num_heads": 2}, "block 1"),
             ((no_cls,), {"num_heads": 2}, "class-token")]
    for args, kw, needle in cases:
        with pytest.raises(DfkdError, match=needle) as e:
            convert_mha_vit(*args, **kw)
        assert "\n" not in str(e.value), (needle, str(e.value))  # one line, every one of them


def test_command_line_writes_weights_and_build_json(tmp_path, capsys):
    torch.manual_seed(3)
    ref = _randomize(MHAViT(img_size=8, patch=2, dim=16, depth=2, heads=2, num_classes=3)).eval()
    src = tmp_path / "vit.pth"
    torch.save(ref.state_dict(), src)
    out = tmp_path / "teacher.safetensors"
    rc = main([str(src), str(out), "--num-heads", "2", "--mean", "0", "0", "0", "--std", "1", "1", "1",
               "--class-names", "a", "b", "c"])
    assert rc == 0 and out.is_file()
    build = json.loads(out.with_suffix(".json").read_text())
    assert {"model", "kwargs", "mean", "std", "input_size", "num_classes", "interpolation", "crop_pct"} <= set(build)
    assert build["input_size"] == [3, 8, 8] and build["num_classes"] == 3 and build["crop_pct"] == 1.0
    assert build["mean"] == [0.0] * 3 and build["std"] == [1.0] * 3 and build["class_names"] == ["a", "b", "c"]
    model = apply_norm_eps(build_model(build["model"], checkpoint=out, **build["kwargs"]), build["norm_eps"]).eval()
    x = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)
    # bad input: one line on stderr, exit status 2
    capsys.readouterr()
    assert main([str(src), str(out), "--num-heads", "2", "--mean", "0", "--std", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--mean" in err and "\n" not in err
    assert main([str(tmp_path / "missing.pth"), str(out), "--num-heads", "2", "--mean", "0", "0", "0",
                 "--std", "1", "1", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "not found" in err and "missing.pth" in err and "\n" not in err, err


# -- the shared third-party checkpoint ---------------------------------------------------------
@pytest.fixture(scope="module")
def ashu():
    root = shared_data()
    if root is None or not (root / ASHU).is_file():
        pytest.skip("needs DFKD_DATA with teachers/vit_cifar10_ashu/vit_model.pth")
    return root


def test_shared_checkpoint_same_logits(ashu):
    state = read_state_dict(ashu / ASHU)
    ref = MHAViT()  # 32x32, patch 4, width 64, depth 4, 4 heads, MLP 256, 10 classes: the README's facts
    ref.load_state_dict(state, strict=True)
    assert sum(p.numel() for p in ref.parameters()) == 208_074
    torch.manual_seed(0)
    kwargs, _ = _same_logits(ref, state, 4, torch.rand(16, 3, 32, 32))
    assert (kwargs["img_size"], kwargs["patch_size"], kwargs["embed_dim"], kwargs["depth"]) == (32, 4, 64, 4)


def test_shared_checkpoint_top1_is_plausible(ashu, tmp_path):
    out = tmp_path / "ashu.safetensors"
    assert main([str(ashu / ASHU), str(out), "--num-heads", "4", "--mean", "0", "0", "0", "--std", "1", "1", "1"]) == 0
    build = json.loads(out.with_suffix(".json").read_text())
    model = apply_norm_eps(build_model(build["model"], checkpoint=out, **build["kwargs"]), build["norm_eps"]).eval()
    d = np.load(ashu / "cifar10" / "cifar10_test.npz")
    idx = np.arange(0, 10_000, 10)  # 1,000 images, 100 per class (the file is ordered by class)
    x = torch.from_numpy(d["images"][idx]).permute(0, 3, 1, 2).float() / 255.0
    y = torch.from_numpy(d["labels"][idx])
    with torch.no_grad():
        logits = model(x)
    # 56.97 % on the full test set (5,697 correct); on this subset 566 correct and this mean
    # cross-entropy (the reference tests/test_byo_teacher.py checks through dfkd-eval)
    assert int((logits.argmax(1) == y).sum()) == 566
    assert float(torch.nn.functional.cross_entropy(logits, y)) == pytest.approx(2.3179123, rel=2e-5)
