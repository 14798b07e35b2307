"""Transformer detectors from ``transformers`` as teachers (dfkd.detection.hf_detectors, ``teacher=hf_detector``).

An optional extra: every test skips when ``transformers`` is not installed. Tiny random YOLOS (a ViT
detector) and DETR (a small HF ResNet backbone) at 64 px, saved with ``save_pretrained`` and loaded
offline, on one thread.
"""

from __future__ import annotations

import json

import pytest
import torch

from dfkd.errors import DfkdError
from test_yolo_task import FixedImages, composed, scenes, write_yolo_folder

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64
SETTINGS = {"image_size": SIZE, "score_thresh": 0.0, "detections_per_img": 3}


def _hooks(*modules) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for mod in modules for m in mod.modules())


def tiny(kind: str):
    """A random detector with ten times the weights of its class and box layers (so that its outputs depend
    on the image, as a trained one's do)."""
    model = _tiny(kind)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("class_labels_classifier", "bbox_predictor")) and name.endswith("weight"):
                p.mul_(10.0)
    return model


def _tiny(kind: str):
    torch.manual_seed(0)
    if kind == "yolos":
        cfg = transformers.YolosConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                       image_size=[SIZE, SIZE], patch_size=16, num_detection_tokens=10, num_labels=3)
        return transformers.YolosForObjectDetection(cfg)
    backbone = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                                         out_features=["stage4"])
    cfg = transformers.DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone,
                                  d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                  decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=5,
                                  num_labels=3)
    return transformers.DetrForObjectDetection(cfg)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_detectors")
    out = {}
    for kind in ("yolos", "detr"):
        model = tiny(kind)
        model.save_pretrained(str(root / kind))
        out[kind] = root / kind
    images, targets = scenes(4, h=48, w=SIZE)
    out["data"] = write_yolo_folder(root / "data", images, targets)
    return out


def teacher(files, kind):
    from dfkd.detection.hf_detectors import load_hf_teacher
    from dfkd.detection.models import DetectionTeacher

    return DetectionTeacher(load_hf_teacher({"checkpoint": str(files[kind]), "kwargs": SETTINGS}))


@pytest.mark.parametrize("kind", ["yolos", "detr"])
def test_teacher_loads_offline_and_detects_as_the_original(files, kind):
    t = teacher(files, kind)
    assert t.num_classes == 3 and t.input_size == (3, SIZE, SIZE) and not t.model.training
    original = tiny(kind).eval()
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dets = t(x)
        ref = original(pixel_values=(x - t.model._mean) / t.model._std)
    probs = ref.logits.softmax(-1)[..., :-1]  # DETR and YOLOS: a last "no object" class
    for i, d in enumerate(dets):
        best = probs[i].max(-1).values.sort(descending=True).values[:3]
        assert len(d["boxes"]) == 3 and torch.allclose(d["scores"], best)
        assert (d["boxes"][:, 2:] >= d["boxes"][:, :2]).all() and d["boxes"].max() <= SIZE


@pytest.mark.parametrize("kind", ["yolos", "detr"])
def test_box_inversion_lowers_the_set_loss_for_the_sampled_boxes(files, kind):
    from generators.box_inversion import BoxInversion

    t = teacher(files, kind)
    # YOLOS has no BatchNorm; DETR's ResNet has (its frozen statistics, here those of a random network)
    kw = dict(batch_size=2, seed=0, lr=0.02, bn=0.0 if kind == "yolos" else 1e-4, tv=0.0, flip=False, jitter=0.0,
              add_teacher_detections=None, boxes_per_image=2, size=(0.3, 0.7))
    start, end = (BoxInversion(t, iterations=n, **kw).step() for n in (0, 8))

    def loss(b):
        with torch.no_grad():
            return float(sum(t.loss(b.images, b.targets).values()))

    before, after = loss(start), loss(end)
    assert after < 0.9 * before, (before, after)
    assert loss(end) == after  # a teacher's loss is deterministic: no dropout
    assert _hooks(t) == 0 and not any(m.training for m in t.modules())


@pytest.mark.parametrize("kind", ["yolos", "detr"])
def test_smaller_student_of_the_same_type_learns_and_loads_back(files, kind, tmp_path):
    from dfkd.detection.models import load_detector, save_detector
    from dfkd.detection.run import DetectionSettings, build_student_detector
    from dfkd.detection.train import distill_detector

    t = teacher(files, kind)
    torch.manual_seed(0)
    student = build_student_detector(t.metadata(), DetectionSettings(student_backbone="hf"))
    assert type(student.hf) is type(t.model.hf)
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in t.parameters())
    x = (0.5 + 0.2 * torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    with pytest.warns(UserWarning, match="need torchvision detectors with a .head"):
        res = distill_detector(t, student, FixedImages(x), steps=24, batch_size=4, lr=3e-3, score_thresh=0.0,
                               class_kd=1.0, memory_size=4, kd_steps_per_round=4, augment=None, progress=False)
    losses = [r["kd/loss"] for r in res["history"]]
    assert losses[-1] < losses[0], losses
    save_detector(student, tmp_path / "s.safetensors")
    again = load_detector(tmp_path / "s.safetensors")
    with torch.no_grad():
        assert all(torch.equal(a["scores"], b["scores"]) for a, b in zip(student.eval()(x), again(x)))


def test_distill_a_yolos_teacher_through_the_command(files, tmp_path):
    from dfkd.pipeline import run_distill

    s = run_distill(composed("teacher=hf_detector", f"teacher.checkpoint={files['yolos']}",
                             *(f"teacher.kwargs.{k}={v}" for k, v in SETTINGS.items()), "data=yolo",
                             f"data.path={files['data']}", "synthesizer=box_inversion", "synthesizer.bn=0",
                             "synthesizer.iterations=2", "synthesizer.flip=false", "synthesizer.batch_size=2",
                             "detection.steps=2", "detection.kd_steps=1", "detection.batch_size=2",
                             "detection.memory_size=4", "detection.score_thresh=0.0", "progress=false", "threads=1",
                             "device=cpu"), tmp_path / "run")
    assert s["teacher"]["arch"] == "hf" and s["student"]["config"]["hidden_size"] == 16 and s["steps"] == 2
    assert s["val_images"] == 4 and 0.0 <= s["student_map50"] <= 1.0 and 0.0 <= s["teacher_map50"] <= 1.0
    assert json.loads((tmp_path / "run" / "student.json").read_text())["arch"] == "hf"


@pytest.mark.parametrize("change, message", [
    ("missing", "HF detector folder not found"),
    ("no_config", "has no config.json"),
    ("bad_setting", "unknown HF detector setting teacher.kwargs.imgsz"),
    ("bad_student", "unknown HF student setting detection.student_kwargs.hidden"),
])
def test_bad_hf_teachers_are_one_line_errors(files, tmp_path, change, message):
    from dfkd.pipeline import run_distill

    ck, extra = files["yolos"], []
    if change == "missing":
        ck = tmp_path / "none"
    elif change == "no_config":
        ck = tmp_path
    elif change == "bad_setting":
        extra = ["+teacher.kwargs.imgsz=64"]
    elif change == "bad_student":
        extra = ["+detection.student_kwargs.hidden=8"]
    with pytest.raises(DfkdError) as e:
        run_distill(composed("teacher=hf_detector", f"teacher.checkpoint={ck}", "synthesizer=box_noise",
                             "data.name=none", "detection.steps=1", "progress=false", "threads=1", "device=cpu",
                             *extra), tmp_path / "o")
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_without_transformers_the_teacher_is_one_line(files, monkeypatch):
    import sys

    from dfkd.detection.hf_detectors import load_hf_teacher

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(DfkdError, match="needs the transformers package: pip install transformers"):
        load_hf_teacher({"checkpoint": str(files["yolos"])})
