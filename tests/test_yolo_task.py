"""YOLO teachers in ``dfkd-distill task=detection`` (dfkd.detection.yolo_task): the YOLO training loss,
box inversion against a YOLO, the student, mAP through the command, one-line errors.

Tiny random detectors of each family — YOLOv5-style (anchor head) and YOLOv8-style (DFL head) built
from the small architecture dicts of test_yolo.py, and a dfkd FCOS — at 32-px inputs on one thread;
the shared YOLOv5n on four coco128 images when ``DFKD_DATA`` is set.
"""

from __future__ import annotations

import contextlib
import functools
import json

import pytest
import torch
import yaml
from torch import nn

from conftest import shared_data
from dfkd.errors import DfkdError
from test_yolo import TINY_V5, TINY_V8, save_original_style

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32
LOOP = ["detection.steps=4", "detection.kd_steps=2", "detection.batch_size=2", "detection.memory_size=8",
        "detection.checkpoint_every=1", "detection.eval_batch_size=8", "synthesizer.batch_size=2",
        "progress=false", "threads=1", "device=cpu"]
INVERSION = ["synthesizer.iterations=2", "synthesizer.flip=false"]
# a tiny teacher is not confident: take its 3 best boxes per image as pseudo-boxes
WEAK_TEACHER = ["detection.score_thresh=0.0", "teacher.kwargs.max_det=3", f"teacher.kwargs.image_size={SIZE}"]


def composed(*overrides):
    """``dfkd-distill``'s config with ``overrides``, composed as the command does."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dfkd.cli.common import config_dir
    from dfkd.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="distill", overrides=list(overrides))


def _hooks(*modules) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for mod in modules for m in mod.modules())


def scenes(n: int, seed: int = 0, h: int = 24, w: int = SIZE, nc: int = 3):
    """Grey images of ``h`` × ``w`` px with one or two coloured rectangles (class = colour) and their boxes."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        x = torch.full((3, h, w), 0.5)
        boxes, labels = [], []
        for _ in range(1 + int(torch.randint(2, (1,), generator=g))):
            c = int(torch.randint(nc, (1,), generator=g))
            bw, bh = (int(v) for v in torch.randint(8, 16, (2,), generator=g))
            x0, y0 = int(torch.randint(0, w - bw, (1,), generator=g)), int(torch.randint(0, h - bh, (1,), generator=g))
            x[:, y0:y0 + bh, x0:x0 + bw] = 0.1
            x[c, y0:y0 + bh, x0:x0 + bw] = 0.9
            boxes.append([x0, y0, x0 + bw, y0 + bh])
            labels.append(c)
        images.append(x)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)})
    return images, targets


def write_yolo_folder(root, images, targets, names=("a", "b", "c")):
    """A YOLO-format detection folder (images/, labels/, data.yaml) of ``images`` with ``targets``."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "data.yaml").write_text(yaml.safe_dump({"names": list(names)}))
    for i, (x, t) in enumerate(zip(images, targets)):
        h, w = x.shape[-2:]
        Image.fromarray((x.permute(1, 2, 0) * 255).round().byte().numpy()).save(root / "images" / f"{i + 1:06d}.png")
        lines = [f"{int(c)} {(b[0] + b[2]) / 2 / w:.6f} {(b[1] + b[3]) / 2 / h:.6f} {(b[2] - b[0]) / w:.6f} "
                 f"{(b[3] - b[1]) / h:.6f}" for b, c in zip(t["boxes"].tolist(), t["labels"].tolist())]
        (root / "labels" / f"{i + 1:06d}.txt").write_text("\n".join(lines) + "\n")
    return root


def letterboxed_scenes(n: int, seed: int = 0):
    """:func:`scenes` of 24 × 32 px letterboxed to 32² (grey rows above and below) with their boxes."""
    images, targets = scenes(n, seed)
    x = torch.stack([torch.nn.functional.pad(im, (0, 0, 4, 4), value=114 / 255) for im in images])
    return x, [{"boxes": t["boxes"] + torch.tensor([0.0, 4.0, 0.0, 4.0]), "labels": t["labels"]} for t in targets]


def trained_yolo(cfg, steps: int = 12):
    """A tiny YOLO trained for a few steps on the scenes, its BatchNorm statistics recomputed on them
    (an untrained YOLO hardly depends on its input)."""
    from dfkd.detection.yolo_task import build_yolo_task_detector

    torch.manual_seed(0)
    det = build_yolo_task_detector(cfg, num_classes=3, image_size=SIZE).train()
    x, targets = letterboxed_scenes(8)
    opt = torch.optim.Adam(det.parameters(), lr=1e-2)
    for i in range(steps):
        k = slice(4 * (i % 2), 4 * (i % 2) + 4)
        loss = sum(det(list(x[k]), targets[k]).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    bns = [m for m in det.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the passes below
    with torch.no_grad():
        det.model(x)
    for bn in bns:
        bn.momentum = 0.03
    return det.model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny YOLOv5- and YOLOv8-style teachers as original-style ``.pt`` files (trained a few steps), a
    random YOLOv8-style one as an architecture ``.yaml``, and a YOLO-format folder of 6 scenes (24 × 32
    px: letterboxed to 32²)."""
    from test_yolo import V8_NAMES

    root = tmp_path_factory.mktemp("yolo_task")
    with pytest.MonkeyPatch.context() as mp:
        save_original_style(root / "v5.pt", mp, model=(trained_yolo(TINY_V5), {"half": False}))
        save_original_style(root / "v8.pt", mp, names=V8_NAMES, model=(trained_yolo(TINY_V8), {"half": False}))
    (root / "v8.yaml").write_text(yaml.safe_dump(TINY_V8))
    images, targets = scenes(6)
    write_yolo_folder(root / "data", images, targets)
    return {"root": root, "v5": root / "v5.pt", "v8": root / "v8.pt", "v8_yaml": root / "v8.yaml",
            "data": root / "data"}


def yolo_teacher(path, **kwargs):
    from dfkd.detection.models import DetectionTeacher
    from dfkd.detection.yolo_task import load_yolo_teacher

    return DetectionTeacher(load_yolo_teacher({"checkpoint": str(path), "kwargs": {"image_size": SIZE, **kwargs}}))


@functools.lru_cache(maxsize=1)
def fcos_teacher():
    """A tiny dfkd FCOS trained for 15 steps on the scenes (an untrained one hardly depends on its input)."""
    from dfkd.detection.models import DetectionTeacher, build_detector
    from dfkd.detection.train import train_detector

    torch.manual_seed(0)
    m = build_detector("fcos", "small_cnn", num_classes=3, image_size=SIZE, width=8, fpn_channels=16, head_convs=1)
    images, targets = scenes(16, h=SIZE)
    train_detector(m, list(zip(images, targets)), steps=15, lr=3e-3, batch_size=8, progress=False)
    return DetectionTeacher(m.eval())


# -- the YOLO loss ------------------------------------------------------------------------------------
def _quality(det, x, targets) -> float:
    """Per target box, the best confidence-for-its-class × IoU over all predictions (batch statistics)."""
    from torchvision.ops import box_iou

    from dfkd.detection.yolo import xywh_to_xyxy

    with torch.no_grad():
        decoded = det.decode(det.model(x))
    best = [((d[:, 4:][:, t["labels"]].T) * box_iou(t["boxes"], xywh_to_xyxy(d[:, :4]))).amax(1)
            for d, t in zip(decoded, targets)]
    return float(torch.cat(best).mean())


@pytest.mark.parametrize("cfg", [TINY_V5, TINY_V8], ids=["v5", "v8"])
def test_yolo_loss_trains_the_network_and_reaches_the_pixels(cfg):
    from dfkd.detection.yolo_task import build_yolo_task_detector

    torch.manual_seed(0)
    det = build_yolo_task_detector(cfg, num_classes=3, image_size=SIZE).train()
    x, targets = letterboxed_scenes(4)
    x.requires_grad_(True)
    losses = det(list(x), targets)
    assert set(losses) == ({"loss_box", "loss_obj", "loss_cls"} if cfg is TINY_V5 else {"loss_box", "loss_cls", "loss_dfl"})
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    assert x.grad is not None and x.grad.abs().sum() > 0  # the teacher's loss reaches the pixels (box inversion)
    x = x.detach()
    start = _quality(det, x, targets)
    opt = torch.optim.Adam(det.parameters(), lr=1e-2)
    for _ in range(24):  # 12 left v8 at the threshold on some CPUs (0.0005 against 0.001); 24 give 0.07
        loss = sum(det(list(x), targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    # (v8's task-aligned targets grow as the predictions improve, so its loss need not fall at first)
    assert _quality(det, x, targets) > 5 * start + 1e-3
    # no targets: only the objectness / class terms, finite
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 4
    assert all(torch.isfinite(v) for v in det(list(x), empty).values())


# -- box inversion for every family ---------------------------------------------------------------------
@pytest.mark.parametrize("family", ["fcos", "yolov5", "yolov8"])
def test_box_inversion_lowers_the_teachers_loss_for_the_sampled_boxes(files, family):
    from generators.box_inversion import BoxInversion

    teacher = {"fcos": fcos_teacher, "yolov5": lambda: yolo_teacher(files["v5"]),
               "yolov8": lambda: yolo_teacher(files["v8"])}[family]()
    kw = dict(batch_size=2, seed=0, lr=0.1, bn=0.001, tv=0.0, flip=False, jitter=0.0, add_teacher_detections=None)
    start = BoxInversion(teacher, iterations=0, **kw).step()
    end = BoxInversion(teacher, iterations=20, **kw).step()
    for a, b in zip(start.targets, end.targets):  # the same sampled boxes, from the same seed
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
    before = float(sum(teacher.loss(start.images, start.targets).values()))
    after = float(sum(teacher.loss(end.images, end.targets).values()))
    assert after < 0.95 * before, (before, after)  # tiny teachers trained for a few steps: a modest drop
    assert _hooks(teacher) == 0 and not teacher.model.training
    assert end.images.min() >= 0 and end.images.max() <= 1 and "syn/prior" in end.stats


# -- the student ----------------------------------------------------------------------------------------
class FixedImages:
    """A source that hands the same images every round."""

    uses_student = False

    def __init__(self, images):
        self.images = images

    def step(self, student=None):
        from generators.base import SyntheticBatch

        return SyntheticBatch(images=self.images)


@pytest.mark.parametrize("family, backbone", [("yolov5", "yolo"), ("yolov8", "yolo"), ("yolov5", "small_cnn")])
def test_the_student_learns_from_a_yolo_teacher(files, family, backbone):
    from dfkd.detection.run import DetectionSettings
    from dfkd.detection.train import distill_detector
    from dfkd.detection.yolo_task import YOLOTaskDetector, build_yolo_task_student

    teacher = yolo_teacher(files["v5" if family == "yolov5" else "v8"], max_det=3)
    tb = teacher.metadata()
    torch.manual_seed(0)
    student = build_yolo_task_student(tb, DetectionSettings(student_backbone=backbone, student_width=4,
                                                            student_fpn=8))
    if backbone == "yolo":  # the teacher's architecture at half its width: same strides, anchors, classes
        assert isinstance(student, YOLOTaskDetector) and student.model.strides == teacher.model.model.strides
        assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters())
    x = (0.5 + 0.2 * torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    with pytest.warns(UserWarning, match="heads differ") if backbone != "yolo" else contextlib.nullcontext():
        res = distill_detector(teacher, student, FixedImages(x), steps=24, batch_size=4, lr=5e-3,
                               score_thresh=0.0, head_matching=backbone == "yolo", class_kd=1.0, memory_size=4,
                               kd_steps_per_round=4, augment=None, progress=False)
    losses = [r["kd/loss"] for r in res["history"]]
    assert losses[-1] < 0.9 * losses[0], losses
    assert res["history"][0]["kd/pseudo_boxes_per_image"] > 0
    if backbone == "yolo":
        assert res["head_matching"] and "kd/head" in res["history"][0] and "kd/class_kd" in res["history"][0]
    assert _hooks(teacher, student) == 0


# -- through the command ----------------------------------------------------------------------------------
def test_distill_a_yolo_pt_teacher_end_to_end(files, tmp_path):
    from dfkd.detection.models import load_detector
    from dfkd.detection.yolo_task import YOLOTaskDetector
    from dfkd.pipeline import format_summary, run_distill

    out = tmp_path / "run"
    s = run_distill(composed("teacher=yolo", f"teacher.checkpoint={files['v5']}", "data=yolo",
                             f"data.path={files['data']}", "synthesizer=box_inversion", "detection.head_matching=true",
                             *LOOP, *INVERSION, *WEAK_TEACHER), out)
    assert s["task"] == "detection" and s["steps"] == 4 and s["images_synthesized"] == 4
    assert s["teacher"]["arch"] == "yolo" and s["student"]["arch"] == "yolo"
    assert s["student"]["yolo_cfg"]["width_multiple"] == TINY_V5["width_multiple"] / 2
    assert s["head_matching"] and s["class_kd"] == 2.0 and s["adi"] == 1.0  # same head geometry: ADI kept
    assert s["val_images"] == 6 and 0.0 <= s["student_map50"] <= 1.0 and 0.0 <= s["teacher_map50"] <= 1.0
    assert s["student_params"] < s["teacher_params"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "syn/adi_js" in rows[0] and "kd/head" in rows[0] and "syn/loss_obj" in rows[0]
    assert "student mAP" in format_summary(s, out)
    # the student saved as any dfkd detector; it loads back (also as a teacher=detector) with equal outputs
    student = load_detector(out / "student.safetensors")
    assert isinstance(student, YOLOTaskDetector) and json.loads((out / "student.json").read_text())["arch"] == "yolo"
    again = load_detector(out / "student.safetensors")
    x = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(student.head_outputs(x), again.head_outputs(x)))


def test_yolov8_teachers_noise_floor_and_real_ceiling(files, tmp_path):
    from dfkd.pipeline import run_distill
    from generators.box_inversion import BoxReal

    common = ["data=yolo", f"data.path={files['data']}", *LOOP, "detection.score_thresh=0.0"]
    # teacher=detector recognises a YOLO file by itself (here an architecture .yaml: random weights)
    s = run_distill(composed("teacher=detector", f"teacher.checkpoint={files['v8_yaml']}", "synthesizer=box_noise",
                             f"+teacher.kwargs.image_size={SIZE}", "+teacher.kwargs.max_det=3", *common),
                    tmp_path / "noise")
    assert s["synthesizer"] == "box_noise" and s["teacher"]["version"] == 8 and s["student"]["arch"] == "fcos"
    s = run_distill(composed("teacher=yolo", f"teacher.checkpoint={files['v8']}", "synthesizer=box_real",
                             f"detection.train_path={files['data']}", *common, *WEAK_TEACHER), tmp_path / "real")
    assert s["synthesizer"] == "box_real" and s["student"]["arch"] == "yolo" and 0.0 <= s["student_map50"] <= 1.0
    from dfkd.data.detection import load_detection

    assert BoxReal(yolo_teacher(files["v8"]), load_detection(files["data"])).resize == "letterbox"
    assert BoxReal(fcos_teacher(), load_detection(files["data"])).resize == "stretch"


@pytest.mark.parametrize("change, message", [
    ("truncated", "cannot read YOLO checkpoint"),
    ("missing", "not found"),
    ("no_architecture", "is not a YOLO architecture description"),
    ("bad_setting", "unknown YOLO teacher setting teacher.kwargs.imgsz"),
    ("bad_student", "unknown YOLO student setting detection.student_kwargs.width"),
    ("no_checkpoint", "teacher=yolo needs teacher.checkpoint=FILE"),
])
def test_bad_yolo_teachers_are_one_line_errors(files, tmp_path, change, message):
    from dfkd.pipeline import run_distill

    ck, extra = files["v5"], []
    if change == "truncated":
        ck = tmp_path / "cut.pt"
        ck.write_bytes(files["v5"].read_bytes()[:5000])
    elif change == "missing":
        ck = tmp_path / "none.pt"
    elif change == "no_architecture":
        ck = tmp_path / "x.yaml"
        ck.write_text("nc: 3\n")
    elif change == "bad_setting":
        extra = ["+teacher.kwargs.imgsz=64"]
    elif change == "bad_student":
        extra = ["+detection.student_kwargs.width=0.1"]
    overrides = ["teacher=yolo", *([] if change == "no_checkpoint" else [f"teacher.checkpoint={ck}"]),
                 "synthesizer=box_noise", "data.name=none", *LOOP, *extra]
    if change == "no_checkpoint":
        overrides.append("teacher.checkpoint=")
    with pytest.raises(DfkdError) as e:
        run_distill(composed(*overrides), tmp_path / "o")
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_cli_bad_yolo_checkpoint_exit_2_one_line(files, tmp_path):
    from conftest import run_cli

    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    r = run_cli("dfkd-distill", "teacher=yolo", f"teacher.checkpoint={bad}", "synthesizer=box_noise",
                "data.name=none", "threads=1", "device=cpu", f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "cannot read YOLO checkpoint" in r.stderr and "Traceback" not in r.stderr


# -- the shared YOLOv5n ---------------------------------------------------------------------------------
def test_shared_yolov5n_through_the_command(tmp_path):
    from dfkd.pipeline import run_distill

    root = shared_data()
    if root is None:
        pytest.skip("DFKD_DATA not set: the shared YOLOv5n is not available")
    pt, coco128 = root / "teachers" / "yolov5n" / "yolov5n.pt", root / "detection" / "coco128"
    if not (pt.is_file() and coco128.is_dir()):
        pytest.skip("DFKD_DATA has no teachers/yolov5n/yolov5n.pt or detection/coco128")
    s = run_distill(composed("teacher=yolo", f"teacher.checkpoint={pt}", "teacher.kwargs.image_size=256",
                             "data=yolo", f"data.path={coco128}", "detection.max_val_images=4",
                             "synthesizer=box_inversion", *LOOP, *INVERSION), tmp_path / "run")
    assert s["teacher_params"] == 1_872_157 and s["teacher"]["num_classes"] == 80
    assert s["teacher"]["class_names"][0] == "person"
    # the real teacher finds the objects of real images at 256 px through the command's evaluation
    assert s["teacher_map50"] > 0.4, s["teacher_map50"]
    assert 0.0 <= s["student_map50"] < s["teacher_map50"]


def test_bench_b4_real_writes_its_results_without_machine_paths(files, tmp_path):
    from conftest import load_script

    bench = load_script("bench_b4_real")
    out = tmp_path / "results"
    rc = bench.main(["--weights", str(files["v5"]), "--data", str(files["data"]), "--image-size", str(SIZE),
                     "--budget-minutes", "0.003", "--kd-batch", "2", "--source-batch", "2", "--inv-batch", "2",
                     "--inv-iterations", "1", "--inv-kd-steps", "1", "--kd-steps", "1", "--score-thresh", "0.0",
                     "--memory-size", "4", "--work", str(tmp_path / "work"), "--out", str(out), "--name", "b4"])
    assert rc == 0
    result = json.loads((out / "b4.json").read_text())
    assert [r["method"] for r in result["rows"]] == ["box_noise", "box_inversion", "box_procedural", "box_real"]
    assert all(r["steps"] >= 1 and 0.0 <= r["map50"] <= 1.0 for r in result["rows"])
    assert result["command"].startswith("python scripts/bench_b4_real.py") and "--work" not in result["command"]
    text = (out / "b4.md").read_text()
    assert "| box_inversion | data-free |" in text and "| box_procedural | data-free (dead-leaves" in text
    assert str(tmp_path / "work") not in json.dumps(result) + text
