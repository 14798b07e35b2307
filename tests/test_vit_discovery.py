"""Transformer discovery for any layout and the teacher-only ViT priors (dfkd.priors_vit)."""

import pytest
import timm
import torch
from torch import nn

from dfkd.errors import DfkdError
from dfkd.hooks import PRIORS, build_prior, parse_prior_spec, resolve_prior_name
from dfkd.models import build_model
from dfkd.models.convert import EncoderViT, MHAViT
from dfkd.priors_vit import (BootstrapTokenPrior, attention_maps, capture_blocks, find_transformer,
                             reset_bootstrap, transformer_layout)

pytestmark = pytest.mark.usefixtures("one_thread")

TEACHER_ONLY = ["vit_patch_entropy", "vit_bootstrap(min_count=4, confidence=0.01)", "vit_head_agreement",
                "vit_patch_contrast", "vit_free(entropy=1, bootstrap=1, heads=1, contrast=1, "
                "bootstrap_kwargs={min_count: 4, confidence: 0.01})"]


def _hooks(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def _timm(distilled=False):
    torch.manual_seed(0)
    name = "deit_tiny_distilled_patch16_224" if distilled else "vit_tiny_patch16_224"
    return build_model(name, img_size=8, patch_size=2, num_classes=4, embed_dim=16, depth=2, num_heads=2,
                       mlp_ratio=2.0)


class _HF(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers import ViTConfig, ViTForImageClassification

        torch.manual_seed(0)
        cfg = ViTConfig(image_size=8, patch_size=2, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, num_labels=4, attn_implementation="sdpa")
        self.net = ViTForImageClassification(cfg)

    def forward(self, x):
        return self.net(pixel_values=x).logits


def _models():
    torch.manual_seed(0)
    out = {
        "timm": (_timm(), "timm", 1),
        "timm_distilled": (_timm(True), "timm", 2),
        "torch_pre": (EncoderViT(norm_first=True, batch_first=True), "torch", 1),
        "torch_post": (EncoderViT(norm_first=False, batch_first=True), "torch", 1),
        "torch_post_seq_first": (EncoderViT(norm_first=False, batch_first=False), "torch", 1),
        "mha": (MHAViT(img_size=8, patch=2, dim=16, depth=2, heads=2, num_classes=4), "mha", 1),
        "mha_seq_first": (MHAViT(img_size=8, patch=2, dim=16, depth=2, heads=2, num_classes=4, batch_first=False),
                          "mha", 1),
    }
    try:
        out["hf"] = (_HF(), "hf", 1)
    except ImportError:  # transformers not installed
        pass
    return out


MODELS = _models()


@pytest.mark.parametrize("key", list(MODELS))
def test_discovery_finds_blocks(key):
    model, kind, prefix = MODELS[key]
    layout = find_transformer(model)
    assert layout is not None and layout.kind == kind
    assert len(layout.blocks) == 2 and layout.prefix == prefix and layout.width == 16
    line = layout.describe()
    assert "\n" not in line and "2 blocks" in line and f"{prefix} prefix" in line
    assert all(b.pre_norm == ("post" not in key) for b in layout.blocks)
    assert all(b.batch_first == ("seq_first" not in key) for b in layout.blocks)
    model.eval()
    with torch.no_grad(), capture_blocks(model, what="attn") as feats:  # eval + no grad: the fast path is off
        model(torch.rand(3, 3, 8, 8))
    n_tokens = 16 + prefix
    assert sorted(feats) == [0, 1] and all(f.shape == (3, n_tokens, 16) for f in feats.values())
    assert _hooks(model) == 0


def test_no_transformer_one_line_error(bn_teacher):
    assert find_transformer(bn_teacher.model) is None
    with pytest.raises(DfkdError, match="no transformer blocks") as e:
        transformer_layout(bn_teacher.model)
    assert "\n" not in str(e.value)
    for kind in TEACHER_ONLY:
        with pytest.raises(DfkdError, match="ViT"):
            resolve_prior_name(bn_teacher.model, kind)


@pytest.mark.parametrize("key", list(MODELS))
@pytest.mark.parametrize("kind", TEACHER_ONLY)
def test_teacher_only_priors_give_pixel_gradients(key, kind):
    model, _, _ = MODELS[key]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    assert timm.layers.use_fused_attn()
    reset_bootstrap(model)
    fast = torch.backends.mha.get_fastpath_enabled()
    for step in range(3):  # the bootstrap prior has a reference from the second step on
        x = torch.rand(6, 3, 8, 8, requires_grad=True)
        with build_prior(model, kind) as prior:
            assert _hooks(model) > 0
            model(x)
            loss = prior.loss()
        assert _hooks(model) == 0 and torch.backends.mha.get_fastpath_enabled() == fast
        (g,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(loss) and torch.isfinite(g).all() and g.abs().sum() > 0, (key, kind, step)
    if kind.startswith("vit_bootstrap"):
        assert BootstrapTokenPrior.reference_count(model) >= 4


def test_hooks_removed_on_error():
    model = MODELS["mha"][0]
    with pytest.raises(RuntimeError):
        with build_prior(model, "vit_free(entropy=1, heads=1, contrast=1)"):
            raise RuntimeError("boom")
    assert _hooks(model) == 0


def test_attention_maps_match_the_module():
    """The recomputed per-head maps equal nn.MultiheadAttention's own (averaged) weights."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(3, 5, 16)
    _, w = attn(x, x, x, need_weights=True, average_attn_weights=True)
    assert torch.allclose(attention_maps(attn, x).mean(1), w, atol=1e-6)


def test_bootstrap_reference_comes_from_confident_images_only():
    model = MHAViT(img_size=8, patch=2, dim=16, depth=2, heads=2, num_classes=4).eval()
    reset_bootstrap(model)
    with build_prior(model, "vit_bootstrap(confidence=0.99)") as prior:  # an untrained head is never this sure
        model(torch.rand(8, 3, 8, 8))
        prior.loss()
    assert BootstrapTokenPrior.reference_count(model) == 0
    with build_prior(model, "vit_bootstrap(confidence=0.01, min_count=1)") as prior:
        model(torch.rand(8, 3, 8, 8))
        prior.loss()
    assert BootstrapTokenPrior.reference_count(model) == 8


def test_prior_spec_parsing_and_registry():
    assert {"vit_bootstrap", "vit_head_agreement", "vit_patch_contrast", "vit_free"} <= set(PRIORS)
    assert parse_prior_spec("vit_free(entropy=1, heads=0.5, bootstrap_kwargs={min_count: 8})") == (
        "vit_free", {"entropy": 1, "heads": 0.5, "bootstrap_kwargs": {"min_count": 8}})
    assert parse_prior_spec({"name": "vit_free", "heads": 2.0}) == ("vit_free", {"heads": 2.0})
    assert parse_prior_spec("batchnorm") == ("batchnorm", {})
    model = MODELS["mha"][0]
    assert resolve_prior_name(model, "auto") == "vit"
    with pytest.raises(DfkdError, match="nothing to compute"):
        resolve_prior_name(model, "vit_free(entropy=0, bootstrap=0)")
    with pytest.raises(DfkdError, match="unexpected keyword|prior"):
        resolve_prior_name(model, "vit_free(nonsense=1)")
    with pytest.raises(DfkdError, match="key=value"):
        parse_prior_spec("vit_free(entropy)")


def test_deepinversion_with_a_teacher_only_prior():
    from dfkd.teacher import Teacher
    from generators import build_synthesizer

    t = Teacher(MHAViT(img_size=8, patch=2, dim=16, depth=2, heads=2, num_classes=4), [0.5] * 3, [0.25] * 3,
                (3, 8, 8), 4)
    syn = build_synthesizer("deepinversion", t, batch_size=4, seed=0, iterations=2,
                            prior="vit_free(entropy=1, heads=1, contrast=1)")
    b = syn.step()
    assert b.images.shape == (4, 3, 8, 8) and torch.isfinite(b.images).all()
    assert _hooks(t) == 0
