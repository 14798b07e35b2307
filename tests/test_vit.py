"""ViT teachers without BatchNorm (statistic priors) and ViT student losses (DeiT token, manifold, feature)."""

import json

import pytest
import timm
import torch
import torch.nn.functional as F

from dfkd.errors import DfkdError
from dfkd.hooks import PRIORS, resolve_prior_name
from dfkd.losses.deit import ViTDistillLoss
from dfkd.losses.feature import layer_pairs
from dfkd.losses.manifold import manifold_terms
from dfkd.losses.student import STUDENT_LOSSES, build_student_loss
from dfkd.models import build_model
from dfkd.priors_vit import (attach_token_statistics, capture_blocks, load_token_statistics,
                             record_token_statistics, save_token_statistics, similarity_entropy)
from dfkd.teacher import Normalized, Teacher
from tests.conftest import ROOT


def _hooks(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def tiny_vit(seed=0, embed_dim=16, depth=2, class_token=True, distilled=False):
    torch.manual_seed(seed)
    name = "deit_tiny_distilled_patch16_224" if distilled else "vit_tiny_patch16_224"
    kw = dict(img_size=8, patch_size=2, in_chans=3, num_classes=4, embed_dim=embed_dim, depth=depth,
              num_heads=2, mlp_ratio=2.0)
    if not distilled:
        kw.update(global_pool="token" if class_token else "avg", class_token=class_token)
    return build_model(name, **kw)


@pytest.fixture
def vit_teacher():
    return Teacher(tiny_vit(0, embed_dim=24), [0.5] * 3, [0.25] * 3, (3, 8, 8), 4)


def test_fused_attention_is_on(vit_teacher):
    assert timm.layers.use_fused_attn()
    assert all(b.attn.fused_attn for b in vit_teacher.model.blocks)


@pytest.mark.parametrize("kind", ["vit", "vit_patch_entropy", "vit_token_stats"])
def test_priors_give_pixel_gradients_and_remove_hooks(vit_teacher, kind):
    attach_token_statistics(vit_teacher.model, record_token_statistics(vit_teacher, torch.rand(32, 3, 8, 8)))
    x = torch.rand(6, 3, 8, 8, requires_grad=True)
    assert _hooks(vit_teacher) == 0
    with vit_teacher.statistics(kind) as prior:
        assert _hooks(vit_teacher) > 0
        vit_teacher(x)
        loss = prior.loss()
    assert _hooks(vit_teacher) == 0
    assert torch.isfinite(loss) and loss.item() > 0
    (g,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    assert all(p.grad is None for p in vit_teacher.parameters())


def test_hooks_removed_on_error(vit_teacher):
    with pytest.raises(RuntimeError):
        with vit_teacher.statistics("vit_patch_entropy"):
            raise RuntimeError("boom")
    assert _hooks(vit_teacher) == 0


def test_patch_entropy_is_higher_for_diverse_tokens():
    torch.manual_seed(0)
    base = torch.randn(1, 1, 8)
    peaked = base + 0.01 * torch.randn(2, 16, 8)  # all patches alike: similarities near 1
    diverse = torch.randn(2, 16, 8)
    assert (similarity_entropy(diverse) > similarity_entropy(peaked) + 0.5).all()


def test_auto_picks_vit_prior_for_vit_and_batchnorm_for_cnn(vit_teacher, bn_teacher):
    assert resolve_prior_name(vit_teacher.model, "auto") == "vit"
    assert resolve_prior_name(bn_teacher.model, "auto") == "batchnorm"
    assert {"vit", "vit_patch_entropy", "vit_token_stats"} <= set(PRIORS)
    with pytest.raises(DfkdError, match="BatchNorm"):
        resolve_prior_name(vit_teacher.model, "batchnorm")
    with pytest.raises(DfkdError, match="ViT"):
        resolve_prior_name(bn_teacher.model, "vit_patch_entropy")
    with pytest.raises(DfkdError, match="token statistics"):  # none recorded yet
        resolve_prior_name(vit_teacher.model, "vit_token_stats")


def test_token_statistics_round_trip(vit_teacher, tmp_path):
    st = record_token_statistics(vit_teacher, torch.rand(16, 3, 8, 8))
    assert st["block0.mean"].shape == (16, 24) and st["block1.var"].shape == (24,)
    save_token_statistics(st, tmp_path / "t.safetensors")
    back = load_token_statistics(tmp_path / "t.safetensors")
    assert all(torch.equal(st[k], back[k]) for k in st)
    attach_token_statistics(vit_teacher.model, tmp_path / "t.safetensors")
    assert "dfkd_token_mean" not in json.dumps(list(vit_teacher.state_dict()))  # not persistent
    assert resolve_prior_name(vit_teacher.model, "vit_token_stats") == "vit_token_stats"


def test_deepinversion_with_vit_teacher(vit_teacher):
    from generators import build_synthesizer

    syn = build_synthesizer("deepinversion", vit_teacher, batch_size=4, seed=0, iterations=2)
    assert syn.prior_name == "vit"
    b = syn.step()
    assert b.images.shape == (4, 3, 8, 8) and 0 <= b.images.min() and b.images.max() <= 1
    assert _hooks(vit_teacher) == 0


@pytest.mark.parametrize("space", ["pixel", "normalized"])
def test_deepinversion_low_resolution_variable_and_random_resized_crop(vit_teacher, space):
    from generators import build_synthesizer

    syn = build_synthesizer("deepinversion", vit_teacher, batch_size=4, seed=0, iterations=3, downsample=2,
                            crop_scale=0.3, space=space, prior="vit_patch_entropy")
    b = syn.step()
    assert b.images.shape == (4, 3, 8, 8) and 0 <= b.images.min() and b.images.max() <= 1
    assert torch.isfinite(b.images).all() and _hooks(vit_teacher) == 0
    assert syn._init().shape[-2:] == (4, 4)  # the variable is 4x4, upsampled to the teacher's 8x8
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    syn._random_resized_crop(x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with pytest.raises(DfkdError, match="downsample"):
        build_synthesizer("deepinversion", vit_teacher, batch_size=4, downsample=3)
    with pytest.raises(DfkdError, match="crop_scale"):
        build_synthesizer("deepinversion", vit_teacher, batch_size=4, crop_scale=0.0)


@pytest.mark.parametrize("downsample", [1, 2])
def test_deepinversion_spectrum_parametrisation(vit_teacher, downsample):
    from generators import build_synthesizer

    syn = build_synthesizer("deepinversion", vit_teacher, batch_size=4, seed=0, iterations=3, spectrum_decay=1.0,
                            downsample=downsample, crop_scale=0.5, prior="vit_patch_entropy", l2=1e-3)
    v = syn._init()
    assert v.shape == (4, 3, 8 // downsample, 8 // downsample // 2 + 1, 2)
    assert abs(float(syn._up(v).std()) - 0.2) < 0.1  # pink noise around grey with the requested pixel std
    b = syn.step()
    assert b.images.shape == (4, 3, 8, 8) and 0 <= b.images.min() and b.images.max() <= 1
    assert torch.isfinite(b.images).all() and _hooks(vit_teacher) == 0
    with pytest.raises(DfkdError, match="spectrum_decay"):
        build_synthesizer("deepinversion", vit_teacher, batch_size=4, spectrum_decay=1.0, space="normalized")


def test_deepinversion_defaults_unchanged_by_new_options(vit_teacher):
    from generators import build_synthesizer

    a = build_synthesizer("deepinversion", vit_teacher, batch_size=4, seed=0, iterations=2, jitter=1).step()
    b = build_synthesizer("deepinversion", vit_teacher, batch_size=4, seed=0, iterations=2, jitter=1, downsample=1,
                          crop_scale=1.0).step()
    assert torch.equal(a.images, b.images)


def _direct_kde_entropy(tokens, grid=64):
    """The patch-similarity entropy with a Gaussian evaluated per (grid point, pair): the reference
    the binned estimator approximates."""
    n = tokens.shape[1]
    z = F.normalize(tokens.float(), dim=-1)
    iu = torch.triu_indices(n, n, offset=1)
    s = (z @ z.transpose(1, 2))[:, iu[0], iu[1]]
    h = (1.06 * s.detach().std(dim=1, keepdim=True) * s.shape[1] ** -0.2).clamp_min(0.01)
    g = torch.linspace(-1.0, 1.0, grid)
    dens = torch.exp(-0.5 * ((g[None, :, None] - s[:, None, :]) / h[:, :, None]) ** 2).mean(-1)
    p = dens / dens.sum(dim=1, keepdim=True)
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim=1)


def test_binned_similarity_entropy_matches_direct_kde():
    torch.manual_seed(0)
    for tokens in (torch.randn(4, 16, 24), torch.randn(4, 1, 24) + 0.7 * torch.randn(4, 16, 24),
                   torch.randn(2, 64, 16)):
        a = tokens.clone().requires_grad_(True)
        b = tokens.clone().requires_grad_(True)
        fast, direct = similarity_entropy(a), _direct_kde_entropy(b)
        assert torch.allclose(fast, direct, rtol=0.05)
        (ga,) = torch.autograd.grad(fast.sum(), a)
        (gb,) = torch.autograd.grad(direct.sum(), b)
        assert F.cosine_similarity(ga.flatten(), gb.flatten(), dim=0) > 0.95


def test_recorded_statistics_sites_and_entropy(vit_teacher):
    from dfkd.priors_vit import PatchEntropyPrior, TokenStatsPrior, ViTPrior, has_entropy_reference

    st = record_token_statistics(vit_teacher, torch.rand(32, 3, 8, 8))
    for i in range(2):
        assert st[f"block{i}.pos_var"].shape == (16, 24) and st[f"block{i}.mid_mean"].shape == (16, 24)
        assert st[f"block{i}.entropy_gap"].shape == (1,) and st[f"block{i}.entropy_gap"].item() > 0
    assert st["block1.out_var"].shape == (24,) and "block0.out_mean" not in st  # last block only
    # files recorded before these keys existed still attach: only the block inputs' mean/var are required
    old = {k: v for k, v in st.items() if k.split(".")[1] in ("mean", "var")}
    attach_token_statistics(vit_teacher.model, old)
    assert not has_entropy_reference(vit_teacher.model)
    assert ViTPrior(vit_teacher.model).parts[0][1].target == "max"
    with pytest.raises(DfkdError, match="recorded"):
        TokenStatsPrior(vit_teacher.model, sites=["in", "mid"])
    attach_token_statistics(vit_teacher.model, st)
    assert has_entropy_reference(vit_teacher.model)
    assert ViTPrior(vit_teacher.model).parts[0][1].target == "recorded"
    x = torch.rand(6, 3, 8, 8, requires_grad=True)
    for prior in (PatchEntropyPrior(vit_teacher.model, target="recorded"),
                  TokenStatsPrior(vit_teacher.model, sites="auto", position_var=True),
                  ViTPrior(vit_teacher.model, token_kwargs={"sites": ["in", "out"]})):
        with prior:
            vit_teacher(x)
            n_terms = len(prior.terms)
            loss = prior.loss()
        assert _hooks(vit_teacher) == 0
        (g,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(loss) and torch.isfinite(g).all() and g.abs().sum() > 0
        if isinstance(prior, TokenStatsPrior):
            assert n_terms == 2 + 2 + 1  # in and mid for each block, out for the last
    # on the very images the statistics were recorded from, the recorded-entropy term is near zero
    ref = torch.rand(64, 3, 8, 8)
    attach_token_statistics(vit_teacher.model, record_token_statistics(vit_teacher, ref))
    with PatchEntropyPrior(vit_teacher.model, target="recorded") as prior:
        vit_teacher(ref)
        assert prior.loss().item() < 0.05
    with pytest.raises(DfkdError, match="site"):
        TokenStatsPrior(vit_teacher.model, sites=["nowhere"])


# -- manifold distillation -------------------------------------------------------------------
def _relations_by_hand(fs, ft, idx):
    """Loops over images / positions with explicit cosine similarities."""
    b, n, _ = fs.shape

    def cos(u, v):
        return float(torch.dot(u, v) / (u.norm() * v.norm()))

    patch = sum(sum((cos(ft[i, p], ft[i, q]) - cos(fs[i, p], fs[i, q])) ** 2 for p in range(n) for q in range(n))
                for i in range(b)) / b
    sample = sum(sum((cos(ft[i, p], ft[j, p]) - cos(fs[i, p], fs[j, p])) ** 2 for i in range(b) for j in range(b))
                 for p in range(n)) / n
    fsr, ftr = fs.reshape(b * n, -1)[idx], ft.reshape(b * n, -1)[idx]
    rand = sum((cos(ftr[a], ftr[c]) - cos(fsr[a], fsr[c])) ** 2 for a in range(len(idx)) for c in range(len(idx)))
    return patch, sample, rand


def test_manifold_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    fs, ft = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 5, generator=g)  # widths differ
    terms = manifold_terms(fs, ft, num_random=4, generator=torch.Generator().manual_seed(7))
    idx = torch.randperm(6, generator=torch.Generator().manual_seed(7))[:4]
    patch, sample, rand = _relations_by_hand(fs, ft, idx)
    assert terms["patch"].item() == pytest.approx(patch, rel=1e-5)
    assert terms["sample"].item() == pytest.approx(sample, rel=1e-5)
    assert terms["rand"].item() == pytest.approx(rand, rel=1e-5)


def test_manifold_zero_when_student_equals_teacher():
    vit = tiny_vit(3)
    teacher = Teacher(vit, [0.5] * 3, [0.25] * 3, (3, 8, 8), 4)
    student = Normalized(tiny_vit(3), [0.5] * 3, [0.25] * 3, (3, 8, 8), 4)
    loss = build_student_loss("manifold", kd=0.0, manifold=1.0)
    value, stats = loss(student, teacher, torch.rand(4, 3, 8, 8))
    assert value.abs().item() < 1e-6 and stats["loss/manifold"] < 1e-6
    assert _hooks(teacher) == 0 and _hooks(student) == 0


def test_layer_pairs():
    assert layer_pairs(2, 4) == [(0, 1), (1, 3)]
    assert layer_pairs(3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert layer_pairs(2, 4, [[-1, -1], [0, 2]]) == [(1, 3), (0, 2)]
    with pytest.raises(DfkdError):
        layer_pairs(2, 4, [[2, 0]])


def test_capture_blocks_reads_outputs_and_removes_hooks():
    vit = tiny_vit(0).eval()
    with capture_blocks(vit, [-1]) as feats:
        vit(torch.rand(2, 3, 8, 8))
    assert feats[1].shape == (2, 17, 16)
    assert _hooks(vit) == 0


# -- feature KD with a learned projection, through the Distiller's optimizer -----------------
def _distiller(teacher, student, loss, pool=64):
    from dfkd.distill import Distiller, DistillSettings
    from generators import build_synthesizer

    syn = build_synthesizer("noise", teacher, batch_size=16, seed=0)
    s = DistillSettings(rounds=1, kd_steps=1, batch_size=16, lr=3e-3, eval_every=0, checkpoint_every=0)
    return Distiller(teacher, student, syn, s, loss=loss, progress=False)


def test_feature_projection_is_optimised(vit_teacher):
    student = Normalized(tiny_vit(1, embed_dim=16, depth=1, class_token=False), [0.5] * 3, [0.25] * 3, (3, 8, 8), 4)
    loss = build_student_loss("feature")
    d = _distiller(vit_teacher, student, loss)
    proj = loss.features.proj["0_1"]
    assert isinstance(proj, torch.nn.Linear) and proj.weight.shape == (24, 16)
    opt_params = {id(p) for g in d.optimizer.param_groups for p in g["params"]}
    assert id(proj.weight) in opt_params
    before = proj.weight.detach().clone()
    d.train_student_step(torch.rand(8, 3, 8, 8))
    assert not torch.equal(before, proj.weight)


def test_combined_weights_from_config_terms(vit_teacher):
    student = Normalized(tiny_vit(1, distilled=True), [0.5] * 3, [0.25] * 3, (3, 8, 8), 4)
    loss = build_student_loss("vit", kd=1.0, deit=1.0, manifold=0.5, feature=0.5, distillation="soft",
                              layers=[[-1, -1]])
    loss.setup(student, vit_teacher)
    student.train()
    value, stats = loss(student, vit_teacher, torch.rand(4, 3, 8, 8))
    assert set(stats) == {"loss/kd", "loss/deit", "loss/manifold", "loss/feature"}
    expect = stats["loss/kd"] + stats["loss/deit"] + 0.5 * stats["loss/manifold"] + 0.5 * stats["loss/feature"]
    assert value.item() == pytest.approx(expect, rel=1e-4)


def test_registered_losses_and_configs():
    import yaml

    from dfkd.pipeline import build_loss_from_cfg

    assert {"vit", "deit", "manifold", "feature", "kd"} <= set(STUDENT_LOSSES)
    for name in ("deit", "deit_soft", "manifold", "feature", "vit"):
        cfg = yaml.safe_load((ROOT / "configs" / "loss" / f"{name}.yaml").read_text())
        assert isinstance(build_loss_from_cfg(cfg), ViTDistillLoss)
    with pytest.raises(DfkdError, match="distill"):
        build_student_loss("deit").setup(Normalized(tiny_vit(1), [0.5] * 3, [0.25] * 3, (3, 8, 8), 4), None)


# -- DeiT distillation token -----------------------------------------------------------------
@pytest.mark.parametrize("variant", ["hard", "soft"])
def test_distillation_token_trains_and_evaluates(vit_teacher, variant):
    student = Normalized(tiny_vit(1, distilled=True), [0.5] * 3, [0.25] * 3, (3, 8, 8), 4)
    loss = build_student_loss("deit", distillation=variant)
    d = _distiller(vit_teacher, student, loss)
    student.train()
    x = torch.rand(16, 3, 8, 8)
    losses = [d.train_student_step(x).item() for _ in range(8)]
    assert losses[-1] < losses[0]
    # train mode: both heads; eval mode: their average (timm's inference behaviour)
    out = student(x)
    assert isinstance(out, tuple) and len(out) == 2
    student.eval()
    with torch.no_grad():
        avg = student(x)
        feats = student.model.forward_features(student.normalize(x))
        cls = student.model.head(feats[:, 0])
        dist = student.model.head_dist(feats[:, 1])
    assert torch.allclose(avg, (cls + dist) / 2, atol=1e-5)
    from dfkd.eval.classification import evaluate
    from dfkd.data import ArrayDataset

    # labels the averaged output gets right on the first half and wrong on the second: top-1 is 1/2
    # exactly, and the loss is the cross-entropy of the average (not of either head alone)
    labels = avg.argmax(1)
    labels[8:] = (labels[8:] + 1) % 4
    student.train()
    res = evaluate(student, ArrayDataset(x, labels))
    assert res["top1"] == 0.5 and res["top5"] == 1.0 and res["n"] == 16
    assert res["loss"] == pytest.approx(float(F.cross_entropy(avg, labels)), rel=1e-5)
    assert float(F.cross_entropy(cls, labels)) != pytest.approx(res["loss"], rel=1e-3)  # the heads differ
    assert student.training  # evaluate restores the mode it found


# -- scripts ---------------------------------------------------------------------------------
def test_train_vit_teacher_smoke(tmp_path):
    from tests.conftest import load_script

    mod = load_script("train_vit_teacher")
    out = tmp_path / "vit_teacher"
    result = mod.main(["--smoke", "--out", str(out)])
    ckpt = out / "teacher.safetensors"
    assert ckpt.is_file() and ckpt.stat().st_size <= 12 * 2**20
    metrics = json.loads((out / "teacher_metrics.json").read_text())
    assert metrics["test_top1"] == result["test_top1"]
    stats = load_token_statistics(out / "teacher.token_stats.safetensors")
    model = build_model(metrics["model"], checkpoint=ckpt, **metrics["kwargs"])
    # the recorded test top-1 is the saved weights' on the digits test split, recomputed here
    from dfkd.data import load_digits
    from dfkd.eval.classification import evaluate

    build = json.loads(ckpt.with_suffix(".json").read_text())
    data = load_digits()
    assert metrics["dataset"] == data.name and build["mean"] == list(data.mean) and build["std"] == list(data.std)
    net = Normalized(model, build["mean"], build["std"], tuple(build["input_size"]), data.num_classes)
    again = evaluate(net, data.test)
    assert metrics["test_top1"] == again["top1"] and metrics["test_loss"] == pytest.approx(again["loss"], rel=1e-6)
    attach_token_statistics(model, stats)
    assert resolve_prior_name(model, "auto") == "vit"


def test_sparse_inversion_drops_patches_and_restores_the_teacher(vit_teacher):
    from generators import build_synthesizer

    vit = vit_teacher.model
    before = vit.patch_drop
    seen = []
    h = vit.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    syn = build_synthesizer("deepinversion", vit_teacher, batch_size=4, seed=0, iterations=6, prior="vit_patch_entropy",
                            sparse_keep=0.25, sparse_at=(0.3, 0.6), crop_scale=0.5, jitter=1, flip=True)
    b = syn.step()
    h.remove()
    assert b.images.shape == (4, 3, 8, 8) and torch.isfinite(b.images).all()
    assert vit.patch_drop is before and _hooks(vit_teacher) == 0
    # 16 patches + 1 class token at first, 4 + 1 after the last drop (the final labelling sees all tokens)
    assert seen[0] == 17 and 5 in seen and min(seen) == 5 and seen[-1] == 17
    with pytest.raises(DfkdError, match="position by position"):
        build_synthesizer("deepinversion", vit_teacher, batch_size=4, prior="vit_bootstrap", sparse_keep=0.5)


def test_sparse_inversion_needs_a_timm_vit(bn_teacher):
    from generators import build_synthesizer

    with pytest.raises(DfkdError, match="timm VisionTransformer"):
        build_synthesizer("deepinversion", bn_teacher, batch_size=4, bn=0.0, sparse_keep=0.5)
