"""torchvision detectors as teachers by builder name (dfkd.detection.tv_detectors, ``teacher=tv_detector``).

Random detectors of each supported family — FCOS, RetinaNet, Faster R-CNN (ResNet-50 and MobileNetV3
FPN), SSDlite, SSD300 — built through the same builder the teacher loader uses (torchvision's, with
``weights=None``), with 4 torchvision classes (background + 3) at a 64-px canvas (SSD300: 300 px, its
smallest working size), on one thread. They load from saved state dicts and detect as the plain
torchvision module does; box inversion lowers their loss for the sampled boxes; a student of the same
family with a smaller backbone learns from their pseudo-boxes; mAP evaluates; bad input is one line;
hooks and modes come back after a run and after an exception.
"""

from __future__ import annotations

import argparse
import contextlib
import json

import pytest
import torch
from torch import nn

from dfkd.errors import DfkdError
from test_yolo_task import FixedImages, composed, scenes, write_yolo_folder

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64
TV_CLASSES = 4  # torchvision counts the background: 3 dfkd classes
SETTINGS = {"score_thresh": 0.0, "detections_per_img": 3}  # a random detector is not confident
FAMILIES = {  # family id -> builder name, checkpoint layout
    "fcos": ("fcos_resnet50_fpn", "plain.pth"),
    "retinanet": ("retinanet_resnet50_fpn", "sd.safetensors"),
    "faster_rcnn_r50": ("fasterrcnn_resnet50_fpn", "model.pth"),
    "faster_rcnn_mbv3": ("fasterrcnn_mobilenet_v3_large_fpn", "reference.pth"),
    "ssdlite": ("ssdlite320_mobilenet_v3_large", "state_dict.pth"),
}
DENSE = ("fcos", "retinanet", "ssdlite")  # families with a dense head (head matching / class KD / ADI)
LOOP = ["detection.steps=2", "detection.kd_steps=1", "detection.batch_size=2", "detection.memory_size=4",
        "detection.checkpoint_every=1", "detection.eval_batch_size=4", "synthesizer.batch_size=2",
        "progress=false", "threads=1", "device=cpu"]


def _hooks(*modules) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_forward_hooks_with_kwargs", {})) for mod in modules for m in mod.modules())


def _modes(*modules) -> list[bool]:
    return [m.training for mod in modules for m in mod.modules()]


class Boom(RuntimeError):
    pass


def _save(state: dict, path) -> None:
    """``state`` in the layout the file name says: a plain state dict, safetensors, ``{"model": sd}``,
    torchvision's reference-script checkpoint (``model`` + ``args`` namespace + ``epoch``), ``{"state_dict": sd}``."""
    name = path.name
    if name.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif name.startswith("model"):
        torch.save({"model": state}, path)
    elif name.startswith("reference"):
        torch.save({"model": state, "args": argparse.Namespace(lr=0.02, epochs=26), "epoch": 25}, path)
    elif name.startswith("state_dict"):
        torch.save({"state_dict": state}, path)
    else:
        torch.save(state, path)


def _conditioned(model: nn.Module) -> nn.Module:
    """A random detector conditioned as a trained one is: BatchNorm statistics measured on images (at
    initialisation a MobileNet's activations vanish layer by layer) and ten times the weights of the last
    class / box layers (so that its outputs depend on the image)."""
    import re

    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average
    x = (0.5 + 0.25 * torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))).clamp(0, 1)
    model.train()
    with torch.no_grad():
        feats = list(model.backbone(model.transform(list(x))[0].tensors).values())
        if hasattr(model, "head"):
            model.head(feats)
    model.eval()
    for bn in bns:
        bn.momentum = 0.1
    last = re.compile(r"(cls_logits|bbox_reg|bbox_ctrness|cls_score|bbox_pred)\.weight$|"
                      r"^head\.(classification|regression)_head\.module_list\.\d+\.1\.weight$")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if last.search(name):
                p.mul_(10.0)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A random detector of each family saved as a state dict (various layouts), and a YOLO-format folder
    of 4 scenes (48 × 64 px)."""
    from dfkd.detection.tv_detectors import build_tv_task_detector

    root = tmp_path_factory.mktemp("tv_detectors")
    out = {"root": root}
    for fam, (name, layout) in FAMILIES.items():
        torch.manual_seed(0)
        model = _conditioned(build_tv_task_detector(name, TV_CLASSES, image_size=SIZE))
        out[fam] = root / f"{fam}_{layout}"
        _save(model.state_dict(), out[fam])
    images, targets = scenes(4, h=48, w=SIZE)
    out["data"] = write_yolo_folder(root / "data", images, targets)
    return out


_TEACHERS: dict = {}


def teacher_of(files, fam: str):
    """The loaded teacher of ``fam`` (cached: every test treats it as frozen)."""
    from dfkd.detection.models import DetectionTeacher
    from dfkd.detection.tv_detectors import load_tv_teacher

    if fam not in _TEACHERS:
        model = load_tv_teacher({"model": FAMILIES[fam][0], "checkpoint": str(files[fam]),
                                 "kwargs": {"image_size": SIZE, **SETTINGS}})
        _TEACHERS[fam] = DetectionTeacher(model)
    return _TEACHERS[fam]


# -- loading --------------------------------------------------------------------------------------------------
def _plain(name: str, state: dict, size: int):
    """The torchvision module as a user holds it: the builder at ``size`` with the state dict loaded."""
    import torchvision

    kw = {} if name.startswith("ssd") else {"min_size": size, "max_size": size}
    m = torchvision.models.get_model_builder(name)(weights=None, weights_backbone=None, num_classes=TV_CLASSES, **kw)
    if name.startswith("ssd"):
        m.transform.fixed_size = (size, size)
    m.load_state_dict(state)
    holder = m.roi_heads if hasattr(m, "roi_heads") else m
    holder.score_thresh, holder.detections_per_img = 0.0, 3
    return m.eval()


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_teacher_loads_from_its_checkpoint_and_detects_as_the_original(files, fam):
    from dfkd.detection.tv_detectors import read_tv_state

    name = FAMILIES[fam][0]
    teacher = teacher_of(files, fam)
    meta = teacher.metadata()
    assert meta["arch"] == "torchvision" and meta["name"] == name and meta["tv_num_classes"] == TV_CLASSES
    assert teacher.num_classes == 3 and meta["class_ids"] == [1, 2, 3] and teacher.input_size == (3, SIZE, SIZE)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.model.training
    plain = _plain(name, read_tv_state(files[fam]), SIZE)
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    odd = torch.rand(3, 40, 56, generator=torch.Generator().manual_seed(4))  # a real image of another size
    with torch.no_grad():
        ours, theirs = teacher([*x, odd]), plain([*x, odd])
    assert sum(len(d["boxes"]) for d in ours) > 0
    for a, b in zip(ours, theirs):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
        assert torch.equal(a["labels"] + 1, b["labels"])  # dfkd's contiguous classes: torchvision's minus background
    assert ours[2]["boxes"].numel() == 0 or ours[2]["boxes"][:, 2].max() <= 56 + 1e-4  # in the image's own pixels


@pytest.mark.slow
def test_ssd300_vgg16_loads_and_detects(tmp_path):
    """SSD300's VGG16 needs about 260 px or more (and its builder makes a whole VGG16 first): one 300-px image,
    loading and detection only (its face is SSDlite's, compared with the original above)."""
    import torchvision

    from dfkd.detection.models import DetectionTeacher
    from dfkd.detection.tv_detectors import load_tv_teacher

    with torch.device("meta"):  # only the shapes: the builder's whole VGG16 is not made twice
        shapes = torchvision.models.detection.ssd300_vgg16(weights=None, weights_backbone=None,
                                                           num_classes=TV_CLASSES).state_dict()
    g = torch.Generator().manual_seed(0)
    state = {k: 0.02 * torch.randn(v.shape, generator=g) for k, v in shapes.items()}
    torch.save(state, tmp_path / "ssd.pt")
    teacher = DetectionTeacher(load_tv_teacher({"model": "ssd300_vgg16", "checkpoint": str(tmp_path / "ssd.pt"),
                                                "kwargs": SETTINGS}))
    assert teacher.input_size == (3, 300, 300) and teacher.num_classes == 3
    assert all(torch.equal(v, state[k]) for k, v in teacher.model.state_dict().items())
    with torch.no_grad():
        d = teacher(torch.rand(1, 3, 300, 300, generator=torch.Generator().manual_seed(3)))[0]
    assert len(d["boxes"]) == 3 and d["labels"].max() < 3
    with pytest.raises(DfkdError, match="no BatchNorm layers"):  # VGG16 has none: the prior says so in one line
        from generators.box_inversion import BoxInversion

        BoxInversion(teacher, batch_size=1, bn=0.05)


def test_coco_heads_keep_the_eighty_categories():
    from dfkd.detection.tv_detectors import build_tv_task_detector

    m = build_tv_task_detector("ssdlite320_mobilenet_v3_large", 91, image_size=SIZE)
    assert m.num_classes == 80 and m.class_names[0] == "person" and m.class_names[-1] == "toothbrush"
    assert m.class_ids[:12] == [*range(1, 12), 13] and 12 not in m.class_ids  # COCO's "N/A" slots are no class


# -- box inversion ----------------------------------------------------------------------------------------------
def _loss(teacher, images, targets) -> float:
    torch.manual_seed(0)  # a two-stage detector samples anchors and proposals: the same draws for both
    with torch.no_grad():
        return float(sum(teacher.loss(images, targets).values()))


@pytest.mark.parametrize("fam", ["fcos", "retinanet", "faster_rcnn_mbv3", "ssdlite"])
def test_box_inversion_lowers_the_teachers_loss_for_the_sampled_boxes(files, fam):
    from generators.box_inversion import BoxInversion

    teacher = teacher_of(files, fam)
    modes = _modes(teacher)
    # a random network reacts to its pixels far more roughly than a trained one: small steps; and no BatchNorm
    # prior (its statistics are those of 8 noise images): what is measured is the teacher's detection loss
    kw = dict(batch_size=2, seed=0, lr=5e-4, bn=0.0, tv=0.0, flip=False, jitter=0.0, add_teacher_detections=None,
              boxes_per_image=2, size=(0.3, 0.7))
    start = BoxInversion(teacher, iterations=0, **kw).step()
    end = BoxInversion(teacher, iterations=4, **kw).step()
    for a, b in zip(start.targets, end.targets):  # the same sampled boxes, from the same seed
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
    before, after = _loss(teacher, start.images, start.targets), _loss(teacher, end.images, end.targets)
    assert after < 0.95 * before, (before, after)  # random teachers, 4 steps: a modest drop
    assert _hooks(teacher) == 0 and _modes(teacher) == modes
    assert end.images.min() >= 0 and end.images.max() <= 1 and end.stats["syn/det"] > 0


# -- the student ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fam", ["fcos", "faster_rcnn_mbv3", "ssdlite"])
def test_the_student_of_the_same_family_learns(files, fam):
    from dfkd.detection.run import DetectionSettings, build_student_detector
    from dfkd.detection.train import distill_detector

    teacher = teacher_of(files, fam)
    torch.manual_seed(0)
    student = build_student_detector(teacher.metadata(), DetectionSettings(student_backbone="torchvision"))
    assert type(student) is type(teacher.model) and student.dfkd_build["backbone"] in ("resnet18", "mobilenet_v3_small")
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
    first = next(student.backbone.parameters()).detach().clone()
    x = (0.5 + 0.2 * torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    dense = fam in DENSE
    ctx = pytest.warns(UserWarning, match="need torchvision detectors with a .head") if not dense else contextlib.nullcontext()
    with ctx:
        res = distill_detector(teacher, student, FixedImages(x), steps=4 if dense else 2, batch_size=4, lr=2e-3, score_thresh=0.0,
                               head_matching=dense, class_kd=1.0 if dense else 0.5, memory_size=4,
                               kd_steps_per_round=2, augment=None, progress=False)
    losses = [r["kd/loss"] for r in res["history"]]
    assert all(torch.isfinite(torch.tensor(losses)))
    if dense:  # (a two-stage student's loss over 4 steps moves with what its RPN proposes and samples)
        assert losses[-1] < losses[0], losses
    assert not torch.equal(first, next(student.backbone.parameters()))
    assert res["history"][0]["kd/pseudo_boxes_per_image"] > 0  # the teacher's best boxes (at most 3 per image)
    assert res["head_matching"] == dense and ("kd/head" in res["history"][0]) == dense
    assert _hooks(teacher, student) == 0 and not student.training


def test_student_saves_and_loads_back_and_scores_map(files, tmp_path):
    from dfkd.data.detection import load_detection
    from dfkd.detection.models import load_detector, save_detector
    from dfkd.detection.run import DetectionSettings, build_student_detector, score_detector

    teacher = teacher_of(files, "ssdlite")
    torch.manual_seed(0)
    student = build_student_detector(teacher.metadata(), DetectionSettings(student_backbone="torchvision"))
    save_detector(student.eval(), tmp_path / "s.safetensors")
    again = load_detector(tmp_path / "s.safetensors")
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "s.safetensors"))) == set(student.state_dict())  # torchvision's own keys
    x = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        a, b = student(x), again(x)
    assert all(torch.equal(p["boxes"], q["boxes"]) for p, q in zip(a, b))
    val = load_detection(files["data"])
    for model in (teacher.model, again):
        r = score_detector(model, val, DetectionSettings(eval_score_thresh=0.0), "cpu")
        assert r["num_images"] == 4 and 0.0 <= r["map50"] <= 1.0 and r["num_detections"] > 0


# -- hooks and modes ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["inversion", "loop", "none"])
def test_no_hook_left_and_modes_restored_after_a_run_or_an_exception(files, monkeypatch, where):
    from dfkd.detection.run import DetectionSettings, build_student_detector
    from dfkd.detection.train import distill_detector
    from generators.box_inversion import BoxInversion

    teacher = teacher_of(files, "ssdlite")
    torch.manual_seed(0)
    student = build_student_detector(teacher.metadata(), DetectionSettings(student_backbone="torchvision"))
    student.train()
    student.backbone.eval()  # mixed modes, to see they come back exactly
    source = BoxInversion(teacher, batch_size=2, iterations=2, adi=1.0, bn=0.05, flip=False)
    before, before_teacher = _modes(teacher, student), _modes(teacher)
    calls = {"loss": 0, "detect": 0}
    real_loss, real_detect = teacher.loss, teacher.detect

    def loss(*a, **k):
        calls["loss"] += 1
        if where == "inversion" and calls["loss"] == 2:  # inside the optimisation: prior and head hooks on
            assert _hooks(teacher) > 0
            raise Boom("inside the inversion step")
        return real_loss(*a, **k)

    def detect(*a, **k):
        calls["detect"] += 1
        if where == "loop" and calls["detect"] == 2:  # a student step: head hooks on, student in train mode
            assert _hooks(teacher, student) > 0 and student.training
            raise Boom("inside the loop")
        return real_detect(*a, **k)

    monkeypatch.setattr(teacher, "loss", loss)
    monkeypatch.setattr(teacher, "detect", detect)
    run = lambda: distill_detector(teacher, student, source, steps=2, batch_size=2, kd_steps_per_round=1,  # noqa: E731
                                   class_kd=1.0, head_matching=True, memory_size=4, score_thresh=0.0,
                                   augment=None, progress=False)
    if where == "none":
        res = run()
        assert res["steps"] == 2 and "syn/adi_js" in res["history"][0] and "kd/head" in res["history"][0]
        # the teacher as it was; the student handed back in eval mode, as distill_detector documents
        assert _hooks(teacher, student) == 0 and _modes(teacher) == before_teacher and not any(_modes(student))
    else:
        with pytest.raises(Boom):
            run()
        assert _hooks(teacher, student) == 0 and _modes(teacher, student) == before


# -- bad input --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ("unknown_name", "unknown torchvision detector 'fcos_resnet_fpn' (did you mean: fcos_resnet50_fpn"),
    ("missing", "torchvision detector checkpoint not found"),
    ("truncated", "cannot read checkpoint"),
    ("other_family", "is not a ssdlite320_mobilenet_v3_large state dict: it has no head.classification_head"),
    ("wrong_shape", "does not fit ssdlite320_mobilenet_v3_large with 4 classes: 1 shape mismatch(es), e.g. backbone"),
    ("missing_key", "does not fit ssdlite320_mobilenet_v3_large with 4 classes: 1 missing key(s), e.g. backbone"),
    ("num_classes", "teacher.num_classes=6 but the checkpoint's ssdlite320_mobilenet_v3_large head has 4 classes"),
    ("no_name", "teacher=tv_detector needs teacher.model=NAME"),
    ("bad_setting", "unknown torchvision detector setting teacher.kwargs.imgsz"),
    ("bad_student", "unknown student backbone 'resnet9'"),
])
def test_bad_teachers_are_one_line_errors(files, tmp_path, change, message):
    from dfkd.detection.tv_detectors import read_tv_state
    from dfkd.pipeline import run_distill

    name, ck, extra = "ssdlite320_mobilenet_v3_large", files["ssdlite"], []
    state = read_tv_state(files["ssdlite"])
    if change == "unknown_name":
        name = "fcos_resnet_fpn"
    elif change == "missing":
        ck = tmp_path / "none.pth"
    elif change == "truncated":
        ck = tmp_path / "cut.pth"
        ck.write_bytes(files["ssdlite"].read_bytes()[:4000])
    elif change == "other_family":
        ck = files["fcos"]
    elif change in ("wrong_shape", "missing_key"):
        k = "backbone.features.0.0.0.weight"
        if change == "wrong_shape":
            state[k] = state[k][:, :2]
        else:
            del state[k]
        ck = tmp_path / "changed.pth"
        torch.save(state, ck)
    elif change == "num_classes":
        extra = ["teacher.num_classes=6"]
    elif change == "bad_setting":
        extra = ["+teacher.kwargs.imgsz=64"]
    elif change == "bad_student":
        extra = ["+detection.student_kwargs.backbone=resnet9"]
    overrides = ["teacher=tv_detector", f"teacher.model={name}", f"teacher.checkpoint={ck}",
                 f"teacher.kwargs.image_size={SIZE}", "synthesizer=box_noise", "data.name=none", *LOOP, *extra]
    if change == "no_name":
        overrides.append("teacher.model=")
    with pytest.raises(DfkdError) as e:
        run_distill(composed(*overrides), tmp_path / "o")
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


# -- through the command ----------------------------------------------------------------------------------------
def test_dfkd_distill_a_tv_detector_end_to_end(files, tmp_path):
    """``dfkd-distill task=detection teacher=tv_detector ...`` at 64 px: box inversion, a MobileNetV3-Small SSDlite
    student with head matching and ADI, mAP of both; a bad checkpoint is one line and exit status 2."""
    from conftest import run_cli_many
    from dfkd.detection.models import load_detector

    out = tmp_path / "run"
    common = ["task=detection", "teacher=tv_detector", "teacher.model=ssdlite320_mobilenet_v3_large",
              f"teacher.kwargs.image_size={SIZE}", "teacher.kwargs.detections_per_img=3", "data=yolo",
              f"data.path={files['data']}", *LOOP, "detection.score_thresh=0.0", "detection.head_matching=true"]
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    ok, err = run_cli_many([
        ("dfkd-distill", [*common, f"teacher.checkpoint={files['ssdlite']}", "synthesizer=box_inversion",
                          "synthesizer.iterations=2", "synthesizer.flip=false", f"hydra.run.dir={out}"]),
        ("dfkd-distill", [*common, f"teacher.checkpoint={bad}", "synthesizer=box_noise",
                          f"hydra.run.dir={tmp_path / 'bad'}"]),
    ])
    assert ok.returncode == 0, ok.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["task"] == "detection" and s["steps"] == 2 and s["images_synthesized"] == 4
    assert s["teacher"]["arch"] == "torchvision" and s["student"]["backbone"] == "mobilenet_v3_small"
    assert s["head_matching"] and s["adi"] == 1.0 and s["student_params"] < s["teacher_params"]
    assert s["val_images"] == 4 and 0.0 <= s["student_map50"] <= 1.0 and 0.0 <= s["teacher_map50"] <= 1.0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "syn/adi_js" in rows[0] and "kd/head" in rows[0] and "syn/classification" in rows[0]
    student = load_detector(out / "student.safetensors")
    assert type(student).__name__ == "TVSSD" and student.num_classes == 3
    assert err.returncode == 2 and err.stderr.count("\n") == 1 and "cannot read checkpoint" in err.stderr, err.stderr
    assert "Traceback" not in err.stderr


def test_a_faster_rcnn_teacher_runs_without_dense_head_terms(files, tmp_path):
    """Faster R-CNN has no dense head: the command drops ADI (with a warning) and skips class KD, and the run
    goes on with the teacher's pseudo-boxes; both detectors are scored."""
    from dfkd.pipeline import run_distill

    with pytest.warns(UserWarning, match="need torchvision detectors with a .head"):
        s = run_distill(composed("teacher=tv_detector", "teacher.model=fasterrcnn_mobilenet_v3_large_fpn",
                                 f"teacher.checkpoint={files['faster_rcnn_mbv3']}", f"teacher.kwargs.image_size={SIZE}",
                                 "teacher.kwargs.detections_per_img=3", "data=yolo", f"data.path={files['data']}",
                                 "synthesizer=box_inversion", "synthesizer.iterations=1", "synthesizer.flip=false",
                                 "synthesizer.bn=0.001", *LOOP, "detection.score_thresh=0.0"), tmp_path / "run")
    assert s["adi"] == 0.0 and s["class_kd"] == 0.0 and not s["head_matching"]
    assert s["student"]["backbone"] == "mobilenet_v3_small" and s["teacher"]["name"] == "fasterrcnn_mobilenet_v3_large_fpn"
    assert s["val_images"] == 4 and 0.0 <= s["student_map50"] <= 1.0 and 0.0 <= s["teacher_map50"] <= 1.0
