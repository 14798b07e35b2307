"""A narrower YOLO initialised from a wider one by channel selection (dfkd.detection.yolo_slim).

Tiny random YOLOv5- and YOLOv8-style networks (the architecture dicts of test_yolo.py) on 64-px
inputs, one thread.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dfkd.detection import yolo_blocks as B
from dfkd.detection.yolo import YOLOModel
from dfkd.detection.yolo_slim import Sel, _Slimmer, concat, init_from_teacher, slimmed_state_dict
from dfkd.detection.yolo_task import narrower_yolo_cfg
from dfkd.errors import DfkdError
from test_yolo import TINY_V5, TINY_V8

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = {"v5": TINY_V5, "v8": TINY_V8}


def network(cfg, seed: int = 0) -> YOLOModel:
    """A random network with non-trivial BatchNorm (γ, β, running statistics), in eval mode."""
    torch.manual_seed(seed)
    m = YOLOModel(cfg)
    for bn in m.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.weight.data.uniform_(0.2, 1.5)
            bn.bias.data.uniform_(-0.3, 0.3)
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def width(cfg) -> float:
    return cfg["scales"][cfg["scale"]][1] if "scales" in cfg else cfg["width_multiple"]


def outputs(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("family", FAMILIES)
def test_at_the_teachers_width_the_selected_student_is_the_teacher(family):
    cfg = FAMILIES[family]
    teacher = network(cfg)
    student = YOLOModel(narrower_yolo_cfg(cfg, width(cfg))).eval()
    init_from_teacher(student, teacher)
    ts, ss = teacher.state_dict(), student.state_dict()
    assert ts.keys() == ss.keys() and all(torch.equal(ts[k], ss[k]) for k in ts)
    x = torch.rand(2, 3, 64, 64)
    for a, b in zip(outputs(teacher, x), outputs(student, x)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("importance", ["bn", "l1"])
@pytest.mark.parametrize("family", FAMILIES)
def test_at_half_width_the_student_builds_loads_strictly_and_is_finite(family, importance):
    cfg = FAMILIES[family]
    teacher = network(cfg)
    student = YOLOModel(narrower_yolo_cfg(cfg)).eval()
    n_t, n_s = (sum(p.numel() for p in m.parameters()) for m in (teacher, student))
    assert n_s < n_t
    state = slimmed_state_dict(teacher, student, importance)
    fresh = YOLOModel(narrower_yolo_cfg(cfg)).eval()
    fresh.load_state_dict(state, strict=True)  # every tensor, each of its shape
    x = torch.rand(2, 3, 64, 64)
    out = outputs(fresh, x)
    assert [r.shape for r in out] == [r.shape for r in outputs(teacher, x)]
    assert all(torch.isfinite(r).all() for r in out)


def _exactly_prunable(teacher: YOLOModel, student: YOLOModel, seed: int = 1) -> None:
    """Zero γ and β of the teacher channels a half-width student cannot hold (a random set per convolution,
    one set per residual stream): those channels are then exactly 0 after SiLU, and a consistent selection
    (by |γ|) reproduces the teacher's outputs exactly."""
    g = torch.Generator().manual_seed(seed)
    s_mods = dict(student.named_modules())

    def mask(n: int, k: int) -> torch.Tensor:
        m = torch.zeros(n, dtype=torch.bool)
        m[torch.randperm(n, generator=g)[:k]] = True
        return m

    def apply(conv: B.Conv, m: torch.Tensor) -> None:
        conv.bn.weight.data[~m] = 0.0
        conv.bn.bias.data[~m] = 0.0

    done = set()
    for name, mod in teacher.named_modules():
        smod = s_mods[name]
        if isinstance(mod, B.C3) and mod.m[0].add:
            m = mask(mod.cv1.conv.out_channels, smod.cv1.conv.out_channels)
            for conv in [mod.cv1] + [b.cv2 for b in mod.m]:
                apply(conv, m)
                done.add(conv)
        elif isinstance(mod, B.C2f):
            c, cs = mod.c, smod.c
            first, second = mask(c, cs), mask(c, cs)
            apply(mod.cv1, torch.cat((first, second)))
            done.add(mod.cv1)
            if mod.m[0].add:
                for b in mod.m:
                    apply(b.cv2, second)
                    done.add(b.cv2)
    for name, mod in teacher.named_modules():
        if isinstance(mod, B.Conv) and mod not in done:
            apply(mod, mask(mod.conv.out_channels, s_mods[name].conv.out_channels))


def _prunable_pair(cfg) -> tuple[YOLOModel, YOLOModel]:
    """An exactly prunable teacher and the half-width student selected from it (by |γ|)."""
    teacher = network(cfg)
    student = YOLOModel(narrower_yolo_cfg(cfg)).eval()
    _exactly_prunable(teacher, student)
    init_from_teacher(student, teacher, "bn")
    return teacher, student


@pytest.mark.parametrize("family", FAMILIES)
def test_the_selection_is_consistent_through_concat_residuals_pools_and_the_head(family):
    """A teacher whose removable channels are exactly zero: the half-width student selected from it gives
    the teacher's outputs (every Concat offset, residual, C2f split, SPPF copy and Detect input right)."""
    cfg = FAMILIES[family]
    teacher, student = _prunable_pair(cfg)
    x = torch.rand(2, 3, 64, 64)
    for a, b in zip(outputs(teacher, x), outputs(student, x)):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_concat_joins_index_sets_with_offsets():
    a, b, c = Sel(torch.tensor([0, 2]), 4), Sel(torch.tensor([1]), 3), Sel(torch.tensor([0, 4]), 5)
    j = concat([a, b, c])
    assert j.n == 12 and j.idx.tolist() == [0, 2, 5, 7, 11]


def test_a_residual_block_keeps_its_inputs_selection():
    torch.manual_seed(0)
    t, s = B.Bottleneck(8, 8, shortcut=True), B.Bottleneck(4, 4, shortcut=True)  # 4 and 2 hidden channels
    t.cv1.bn.weight.data = torch.tensor([0.1, 2.0, 0.3, 1.5])
    sl = _Slimmer(t, s, "bn")
    x = Sel(torch.tensor([1, 3, 4, 6]), 8)
    out = sl.bottleneck(t, s, x)
    assert torch.equal(out.idx, x.idx) and out.n == 8
    hidden = _top_idx(t.cv1, 2)
    assert hidden.tolist() == [1, 3]  # the hidden channels by importance; cv2 reads those and writes x's channels
    assert torch.equal(sl.state["cv1.conv.weight"], t.cv1.conv.weight[hidden][:, x.idx])
    assert torch.equal(sl.state["cv2.conv.weight"], t.cv2.conv.weight[x.idx][:, hidden])
    assert torch.equal(sl.state["cv2.bn.running_mean"], t.cv2.bn.running_mean[x.idx])
    # without the shortcut the output is chosen by importance
    t2, s2 = B.Bottleneck(8, 8, shortcut=False), B.Bottleneck(4, 4, shortcut=False)
    t2.cv2.bn.weight.data = torch.tensor([0.0, 5, 0, 4, 0, 3, 0, 2])
    out = _Slimmer(t2, s2, "bn").bottleneck(t2, s2, x)
    assert out.idx.tolist() == [1, 3, 5, 7]


def _top_idx(conv: B.Conv, k: int) -> torch.Tensor:
    return conv.bn.weight.detach().abs().topk(k).indices.sort().values


def test_a_wider_or_deeper_student_is_one_line():
    teacher = network(TINY_V5)
    with pytest.raises(DfkdError, match="at most as wide"):
        init_from_teacher(YOLOModel(narrower_yolo_cfg(TINY_V5, 0.25)), teacher)
    deep = copy.deepcopy(TINY_V5)
    with pytest.raises(DfkdError, match="at most as deep"):
        init_from_teacher(YOLOModel(narrower_yolo_cfg(deep, 0.0625, 1.0)), teacher)
    with pytest.raises(DfkdError, match="unknown channel importance 'gamma'"):
        init_from_teacher(YOLOModel(narrower_yolo_cfg(TINY_V5)), teacher, "gamma")


def test_a_shallower_student_keeps_each_blocks_first_bottlenecks():
    deep_teacher = network(narrower_yolo_cfg(TINY_V5, width(TINY_V5), 1.0))  # its first C3: 3 bottlenecks
    student = YOLOModel(narrower_yolo_cfg(TINY_V5, width(TINY_V5), 0.33)).eval()
    init_from_teacher(student, deep_teacher)
    assert len(deep_teacher.model[2].m) == 3 and len(student.model[2].m) == 1
    assert torch.equal(student.model[2].m[0].cv1.conv.weight, deep_teacher.model[2].m[0].cv1.conv.weight)


def test_student_init_teacher_through_the_command(tmp_path):
    """``detection.student_init=teacher``: a YOLO student starts from the teacher's selected weights (at the
    teacher's width and a vanishing lr its convolutions stay the teacher's); a non-YOLO pair is one line."""
    import yaml

    from dfkd.detection.models import load_detector
    from dfkd.detection.yolo_task import load_yolo_teacher
    from dfkd.pipeline import run_distill
    from test_yolo_task import composed

    arch = tmp_path / "tiny.yaml"
    arch.write_text(yaml.safe_dump(TINY_V5))
    loop = ["teacher=yolo", f"teacher.checkpoint={arch}", "teacher.kwargs.image_size=64", "data.name=none",
            "synthesizer=box_noise", "synthesizer.batch_size=2", "detection.steps=1", "detection.kd_steps=1",
            "detection.batch_size=2", "detection.memory_size=2", "detection.lr=1e-12", "detection.score_thresh=0.0",
            "teacher.kwargs.max_det=3", "progress=false", "threads=1", "device=cpu"]
    run_distill(composed(*loop, "detection.student_init=teacher", "+detection.student_kwargs.importance=l1",
                         f"+detection.student_kwargs.width_multiple={TINY_V5['width_multiple']}"), tmp_path / "run")
    student = load_detector(tmp_path / "run" / "student.safetensors")
    teacher = load_yolo_teacher({"source": "yolo", "checkpoint": str(arch), "kwargs": {"image_size": 64}})
    for (name, a), b in zip(teacher.model.named_parameters(), student.model.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    with pytest.raises(DfkdError, match="student_init must be scratch or teacher"):
        run_distill(composed(*loop, "detection.student_init=pretrained"), tmp_path / "bad")
    with pytest.raises(DfkdError, match="needs a YOLO teacher .* and a YOLO student"):
        run_distill(composed(*loop, "detection.student_init=teacher", "detection.student_backbone=small_cnn"),
                    tmp_path / "fcos")


def test_compensation_from_input_statistics_brings_the_student_closer():
    """``images=``: each dropped input channel replaced by its least-squares estimate from the kept ones (the
    teacher's channel statistics on those images) — the half-width student's outputs come closer to the
    teacher's than by selection alone; at the teacher's width nothing changes."""
    teacher = network(TINY_V5)
    torch.manual_seed(3)
    x = torch.rand(8, 3, 64, 64)
    plain = init_from_teacher(YOLOModel(narrower_yolo_cfg(TINY_V5)).eval(), teacher)
    comp = init_from_teacher(YOLOModel(narrower_yolo_cfg(TINY_V5)).eval(), teacher, images=x)
    ref = outputs(teacher, x)

    def err(m):
        return sum(((a - b) ** 2).mean().item() for a, b in zip(outputs(m, x), ref))

    assert err(comp) < 0.5 * err(plain)
    teacher.train()
    init_from_teacher(YOLOModel(narrower_yolo_cfg(TINY_V5)).eval(), teacher, images=x)
    assert all(m.training for m in teacher.modules())  # its modes restored, its hooks removed
    assert not any(m._forward_pre_hooks for m in teacher.modules())
    teacher.eval()
    same = init_from_teacher(YOLOModel(narrower_yolo_cfg(TINY_V5, width(TINY_V5))).eval(), teacher, images=x)
    assert all(torch.equal(a, b) for a, b in zip(outputs(same, x), ref))


def _detect_inputs(model: YOLOModel, x: torch.Tensor) -> list[torch.Tensor]:
    from dfkd.detection.train import _DetectInputs

    rec = _DetectInputs(model.head)
    try:
        outputs(model, x)
    finally:
        rec.remove()
    assert not model.head._forward_pre_hooks
    return rec.out


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_channels_name_the_teacher_features_the_student_starts_from(family):
    """On a teacher whose removable channels are exactly zero, the half-width student's neck features equal
    the teacher's at :func:`kept_channels` (so the feature loss is 0 at the start); any other choice of
    channels (here the first ones) is not, and neither is a teacher with nothing removable."""
    from dfkd.detection.train import neck_feature_loss
    from dfkd.detection.yolo_slim import kept_channels

    cfg = FAMILIES[family]
    teacher, student = _prunable_pair(cfg)
    x = torch.rand(2, 3, 64, 64)
    ft, fs = _detect_inputs(teacher, x), _detect_inputs(student, x)
    idx = kept_channels(teacher, student, "bn")
    assert [len(i) for i in idx] == [f.shape[1] for f in fs] and len(idx) == len(student.strides)
    assert all(len(i) < f.shape[1] for i, f in zip(idx, ft))  # the student really is narrower
    assert neck_feature_loss(fs, ft, idx).item() < 1e-8
    first = [torch.arange(len(i)) for i in idx]
    assert not all(torch.equal(a, b) for a, b in zip(first, idx))
    assert neck_feature_loss(fs, ft, first).item() > 1e-3
    dense = network(cfg, seed=3)
    plain = YOLOModel(narrower_yolo_cfg(cfg)).eval()
    init_from_teacher(plain, dense, "bn")
    assert neck_feature_loss(_detect_inputs(plain, x), _detect_inputs(dense, x),
                             kept_channels(dense, plain, "bn")).item() > 1e-3


def test_feature_kd_through_the_command(tmp_path):
    """``detection.feature_kd``: the run logs the feature term, leaves no hook on either network; without
    ``detection.student_init=teacher`` it is one line."""
    import json

    import yaml

    from dfkd.pipeline import run_distill
    from test_yolo_task import composed

    arch = tmp_path / "tiny.yaml"
    arch.write_text(yaml.safe_dump(TINY_V5))
    loop = ["teacher=yolo", f"teacher.checkpoint={arch}", "teacher.kwargs.image_size=64", "data.name=none",
            "synthesizer=box_noise", "synthesizer.batch_size=2", "detection.steps=4", "detection.kd_steps=2",
            "detection.batch_size=2", "detection.memory_size=4", "detection.score_thresh=0.0",
            "teacher.kwargs.max_det=3", "progress=false", "threads=1", "device=cpu"]
    run_distill(composed(*loop, "detection.student_init=teacher", "detection.feature_kd=1.0"), tmp_path / "run")
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    feats = [r["kd/feature"] for r in recs if "kd/feature" in r]
    assert feats and all(0 <= f < float("inf") for f in feats)
    with pytest.raises(DfkdError, match="feature_kd needs detection.student_init=teacher"):
        run_distill(composed(*loop, "detection.feature_kd=1.0"), tmp_path / "bad")


def test_freeze_bn_keeps_the_starting_statistics(tmp_path):
    """``detection.freeze_bn=true``: after training, a teacher-initialised student's BatchNorm running statistics
    are still the teacher's (its convolutions did change); without it they move to the synthetic batches'."""
    import yaml

    from dfkd.detection.models import load_detector
    from dfkd.detection.yolo_task import load_yolo_teacher
    from dfkd.pipeline import run_distill
    from test_yolo_task import composed

    arch = tmp_path / "tiny.yaml"
    arch.write_text(yaml.safe_dump(TINY_V5))
    loop = ["teacher=yolo", f"teacher.checkpoint={arch}", "teacher.kwargs.image_size=64", "data.name=none",
            "synthesizer=box_noise", "synthesizer.batch_size=2", "detection.steps=3", "detection.kd_steps=3",
            "detection.batch_size=2", "detection.memory_size=2", "detection.score_thresh=0.0", "detection.lr=0.01",
            "teacher.kwargs.max_det=3", "progress=false", "threads=1", "device=cpu", "detection.student_init=teacher",
            f"+detection.student_kwargs.width_multiple={TINY_V5['width_multiple']}"]
    teacher = load_yolo_teacher({"source": "yolo", "checkpoint": str(arch), "kwargs": {"image_size": 64}})
    t_bn = {k: v for k, v in teacher.model.state_dict().items() if "running" in k}
    moved = {}
    for freeze in (True, False):
        run_distill(composed(*loop, f"detection.freeze_bn={str(freeze).lower()}"), tmp_path / str(freeze))
        st = load_detector(tmp_path / str(freeze) / "student.safetensors").model.state_dict()
        moved[freeze] = max((st[k] - v).abs().max().item() for k, v in t_bn.items())
        assert any(not torch.allclose(st[k], v) for k, v in teacher.model.state_dict().items() if "conv.weight" in k)
    assert moved[True] == 0.0 and moved[False] > 1e-4
    with pytest.raises(DfkdError, match="freeze_bn must be true or false"):
        run_distill(composed(*loop, "detection.freeze_bn=sometimes"), tmp_path / "bad")


def test_batchnorm_matched_images_match_the_teachers_statistics():
    """``batchnorm_matched_images``: dead leaves optimised towards every BatchNorm layer's running statistics
    end closer to them than the dead leaves they start from; in [0, 1], seeded; the teacher's modes,
    ``requires_grad`` flags and hooks are as before."""
    from dfkd.hooks import BatchNormPrior
    from dfkd.detection.yolo_slim import batchnorm_matched_images
    from generators.procedural import procedural_images

    teacher = network(TINY_V5)
    for bn in teacher.modules():  # running statistics of a domain (uniform noise) that dead leaves are not
        if isinstance(bn, nn.BatchNorm2d):
            bn.reset_running_stats()
            bn.momentum = None
    with torch.no_grad():
        teacher.train()(torch.rand(16, 3, 64, 64, generator=torch.Generator().manual_seed(5)))

    def distance(x):
        with torch.no_grad(), BatchNormPrior(teacher) as prior:
            teacher(x)
            return prior.loss().item()

    start = procedural_images("dead_leaves", 4, (3, 64, 64), torch.Generator().manual_seed(0))
    teacher.train()
    teacher.model[0].conv.weight.requires_grad_(False)
    imgs = batchnorm_matched_images(teacher, 4, 64, iterations=40, batch=4, seed=0)
    assert all(m.training for m in teacher.modules())
    assert not teacher.model[0].conv.weight.requires_grad and teacher.model[1].conv.weight.requires_grad
    assert not any(m._forward_hooks for m in teacher.modules())
    teacher.eval()
    assert imgs.shape == (4, 3, 64, 64) and 0 <= imgs.min() and imgs.max() <= 1
    assert distance(imgs) < 0.7 * distance(start)
    assert torch.equal(imgs, batchnorm_matched_images(teacher, 4, 64, iterations=40, batch=4, seed=0))


def test_compensate_through_the_command(tmp_path, monkeypatch):
    """``detection.compensate=inversion``: the teacher-initialised student starts from compensated weights
    (not the plain selection); the images are kept in ``detection.compensate_cache`` and read back by a
    run with the same settings, remade when a setting differs; bad values are one line."""
    import json

    import yaml

    from dfkd.detection import yolo_slim
    from dfkd.pipeline import run_distill
    from test_yolo_task import composed

    arch = tmp_path / "tiny.yaml"
    arch.write_text(yaml.safe_dump(TINY_V5))
    cache = tmp_path / "cache" / "images.pt"
    loop = ["teacher=yolo", f"teacher.checkpoint={arch}", "teacher.kwargs.image_size=64", "data.name=none",
            "synthesizer=box_noise", "synthesizer.batch_size=2", "detection.steps=1", "detection.kd_steps=1",
            "detection.batch_size=2", "detection.memory_size=2", "detection.score_thresh=0.0", "detection.lr=1e-12",
            "teacher.kwargs.max_det=3", "progress=false", "threads=1", "device=cpu", "detection.student_init=teacher",
            "detection.compensate_images=4", f"detection.compensate_cache={cache}"]
    made = []
    real = yolo_slim.batchnorm_matched_images
    monkeypatch.setattr(yolo_slim, "batchnorm_matched_images", lambda *a, **k: made.append(1) or real(*a, **k))
    s = run_distill(composed(*loop, "detection.compensate=inversion", "detection.compensate_iterations=3"),
                    tmp_path / "a")
    assert made == [1] and cache.is_file()
    assert s["compensate"] == "inversion" and s["student_init_seconds"] > 0
    run_distill(composed(*loop, "detection.compensate=inversion", "detection.compensate_iterations=3"), tmp_path / "b")
    assert made == [1]  # read from the cache
    run_distill(composed(*loop, "detection.compensate=inversion", "detection.compensate_iterations=4"), tmp_path / "c")
    assert made == [1, 1]  # another setting: made again
    plain = run_distill(composed(*loop), tmp_path / "plain")
    assert plain["compensate"] == "none"

    def conv_weights(d):
        from dfkd.detection.models import load_detector

        return [p for n, p in load_detector(d / "student.safetensors").model.named_parameters() if "conv.weight" in n]

    assert any(not torch.allclose(a, b) for a, b in zip(conv_weights(tmp_path / "c"), conv_weights(tmp_path / "plain")))
    assert json.loads((tmp_path / "c" / "config.json").read_text())["detection"]["compensate"] == "inversion"
    with pytest.raises(DfkdError, match="detection.compensate must be one of none, dead_leaves, inversion"):
        run_distill(composed(*loop, "detection.compensate=real"), tmp_path / "bad")
    with pytest.raises(DfkdError, match="compensate needs detection.student_init=teacher"):
        run_distill(composed(*[o for o in loop if "student_init" not in o], "detection.compensate=inversion"),
                    tmp_path / "bad2")
