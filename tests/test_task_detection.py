"""``dfkd-distill task=detection``: data-free detector distillation through the one entry point.

A tiny teacher detector trained for a few steps on tiny digits canvases; every run is a few
optimizer steps on one CPU thread. Also: the synthesizer's task is checked against the run's, and an
exception inside a box-inversion step or inside the detection loop leaves no hook registered and
every module's train/eval mode as it was.
"""

import json
import signal
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from dfkd.errors import DfkdError

pytestmark = pytest.mark.usefixtures("one_thread")

LOOP = ["detection.steps=4", "detection.kd_steps=2", "detection.batch_size=4", "detection.memory_size=16",
        "detection.flip=false", "detection.checkpoint_every=1", "synthesizer.batch_size=4", "progress=false",
        "threads=1", "device=cpu"]
TINY = [*LOOP, "synthesizer.iterations=2", "synthesizer.flip=false"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Digits canvases (RGB files) and a grayscale teacher detector trained on them for a few steps."""
    from dfkd.data.detection import build_canvas_benchmark, load_detection
    from dfkd.detection.models import build_detector, save_detector
    from dfkd.detection.train import train_detector

    root = tmp_path_factory.mktemp("task_det")
    paths = build_canvas_benchmark("digits", root / "canvases", train_canvases=40, test_canvases=12)
    train = load_detection(paths["train"])
    train.transform = lambda image, target: (image.mean(0, keepdim=True), target)
    torch.manual_seed(0)
    teacher = build_detector("fcos", "small_cnn", num_classes=train.num_classes, image_size=32, in_chans=1,
                             mean=(0.4,), std=(0.3,), width=8, fpn_channels=16, head_convs=1)
    # 60 steps: mAP@.5 about 0.14 on the 12 validation canvases (20 steps score 0, and every detector
    # that scores 0 looks alike to the tests that compare reported figures with recomputed ones)
    train_detector(teacher, train, steps=60, lr=3e-3, batch_size=8, progress=False)
    save_detector(teacher, root / "teacher.safetensors")
    return {"root": root, "teacher": root / "teacher.safetensors", "val": paths["test"], "train": paths["train"]}


def base(setup, synthesizer="box_inversion"):
    return ["task=detection", "teacher=detector", f"teacher.checkpoint={setup['teacher']}", "data=canvases",
            f"data.path={setup['val']}", f"synthesizer={synthesizer}"]


def composed(*overrides):
    from dfkd.cli.common import config_dir
    from dfkd.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="distill", overrides=list(overrides))


def test_distill_task_detection_end_to_end_and_extends(setup, tmp_path):
    from dfkd.detection.models import load_detector
    from dfkd.pipeline import format_summary, run_distill

    out = tmp_path / "run"
    s = run_distill(composed(*base(setup), *TINY), out)
    assert s["task"] == "detection" and s["steps"] == 4 and s["rounds"] == 2 and s["images_synthesized"] == 8
    assert s["class_kd"] == 2.0 and s["adi"] == 1.0 and s["val_images"] == 12
    assert s["student_params"] < s["teacher_params"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2] and "syn/adi_js" in lines[0] and "kd/class_kd" in lines[0]
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    assert (out / "checkpoint.pt").is_file() and (out / "config.json").is_file()
    student = load_detector(out / "student.safetensors")
    assert student.dfkd_build["in_chans"] == 1 and student.dfkd_build["width"] == 4  # half the teacher's
    # the reported figures are the saved student's and the teacher's on the validation canvases, scored
    # again here; the teacher finds digits (a student of 4 steps does not), so the two are told apart
    from dfkd.detection.run import DetectionSettings, load_eval_set, score_detector

    val = load_eval_set({"name": "canvases", "path": str(setup["val"])}, None, 1)
    scored = {who: score_detector(model, val, DetectionSettings(), "cpu")
              for who, model in (("student", student), ("teacher", load_detector(setup["teacher"])))}
    for who, r in scored.items():
        assert [s[f"{who}_map"], s[f"{who}_map50"], s[f"{who}_map75"]] == [r["map"], r["map50"], r["map75"]], who
    assert s["teacher_map50"] > 0.05 and s["teacher_per_class_ap"] == scored["teacher"]["per_class"]
    assert s["num_detections"] == scored["student"]["num_detections"]
    assert s["per_class_ap"] == scored["student"]["per_class"]
    assert "student mAP" in format_summary(s, out)

    # the same command with more steps continues the saved run
    s = run_distill(composed(*base(setup), *TINY, "detection.steps=8"), out)
    assert s["steps"] == 8 and s["rounds"] == 4 and s["images_synthesized"] == 16
    assert [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]

    # other settings: one line naming the setting; resume=false starts over
    with pytest.raises(DfkdError, match=r"other settings \(detection.lr"):
        run_distill(composed(*base(setup), *TINY, "detection.steps=8", "detection.lr=1e-3"), out)
    s = run_distill(composed(*base(setup), *TINY, "detection.lr=1e-3", "resume=false"), out)
    assert s["steps"] == 4


def test_noise_floor_and_real_ceiling_sources(setup, tmp_path):
    from dfkd.pipeline import run_distill

    s = run_distill(composed(*base(setup, "box_noise"), *LOOP, "data.name=none"), tmp_path / "noise")
    assert s["synthesizer"] == "box_noise" and s["kd_steps"] == 2 and "student_map" not in s
    with pytest.raises(DfkdError, match="detection.train_path"):
        run_distill(composed(*base(setup, "box_real"), *LOOP), tmp_path / "real0")
    s = run_distill(composed(*base(setup, "box_real"), *LOOP, f"detection.train_path={setup['train']}"),
                    tmp_path / "real")
    assert s["synthesizer"] == "box_real" and s["images_synthesized"] == 8


def test_other_student_geometry_runs_without_adi(setup, tmp_path):
    from dfkd.pipeline import run_distill

    s = run_distill(composed(*base(setup), *TINY, "detection.student_backbone=resnet8_cifar"), tmp_path / "r")
    assert s["adi"] == 0.0 and s["student"]["backbone"] == "resnet8_cifar"


@pytest.mark.parametrize("overrides, message", [
    (["task=classification", "synthesizer=box_inversion"], "makes detection data, but task=classification"),
    (["task=detection", "synthesizer=deepinversion"], "makes classification data, but task=detection"),
    (["task=detection", "teacher=detector", "synthesizer=box_inversion", "+detection.stepz=3"],
     "unknown setting detection.stepz (did you mean: steps"),
    (["task=detection", "teacher=detector", "synthesizer=box_inversion", "detection.steps=0"],
     "detection.steps must be an integer of at least 1"),
    (["task=detection", "synthesizer=box_inversion"], "task=detection reads the teacher's build"),
    (["task=detection", "teacher=detector", "synthesizer=box_inversion", "data=digits"],
     "task=detection scores the student on data=coco|yolo|voc|canvases"),
    (["task=detection", "teacher=detector", "synthesizer=box_inversion", "+synthesizer.iteration=3"],
     "unknown setting synthesizer.iteration"),
])
def test_bad_input_is_one_clear_error(setup, tmp_path, overrides, message):
    from dfkd.pipeline import run_distill

    extra = [f"teacher.checkpoint={setup['teacher']}"] if "teacher=detector" in overrides else []
    if "data=digits" not in overrides and "teacher=detector" in overrides:
        extra += ["data=canvases", f"data.path={setup['val']}"]
    with pytest.raises(DfkdError) as e:
        run_distill(composed(*overrides, *extra, "progress=false", "threads=1", "device=cpu"), tmp_path / "o")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_cli_error_is_one_line(setup):
    from conftest import run_forked

    r = run_forked("dfkd-distill", "task=detection", "synthesizer=deepinversion", "threads=1")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "task=detection" in r.stderr, r.stderr


def _cmd(setup, out, steps):
    return [sys.executable, "-m", "dfkd.cli.distill", *base(setup), *TINY, f"detection.steps={steps}",
            "data.name=none", f"hydra.run.dir={out}"]


# Runs dfkd-distill and SIGKILLs its own process right after a checkpoint at step 4 or later is on disk.
def _kill_after_step_4() -> str:
    from conftest import kill_after_checkpoint

    return kill_after_checkpoint('st["run"]["step"] >= 4')


def test_sigkill_then_resume_equals_uninterrupted(setup, tmp_path):
    """Killed mid-run (SIGKILL: no handler runs), the same command continues from the last saved round
    and ends with the same student as a run that was never interrupted."""
    from safetensors.torch import load_file

    from conftest import run_forked

    env = {"OMP_NUM_THREADS": "1"}
    steps = 8  # 4 rounds of 2 steps, a checkpoint after each; killed after the second
    out = tmp_path / "killed"
    cmd = _cmd(setup, out, steps)
    killed = run_forked(*cmd[3:], code=_kill_after_step_4(), env=env)  # each command a process of its own
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ckpt = out / "checkpoint.pt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["run"]["step"]
    assert saved == 4 and not (out / "summary.json").exists()
    assert [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    run = run_forked("dfkd-distill", *cmd[3:], env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"resuming {out} at step {saved}" in run.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == steps
    rounds = [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3, 4]

    from dfkd.pipeline import run_distill

    whole = tmp_path / "whole"  # the same settings, never interrupted (in this process: one start-up less)
    overrides = _cmd(setup, whole, steps)[3:-1]
    run_distill(composed(*overrides), whole)
    a, b = load_file(out / "student.safetensors"), load_file(whole / "student.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- hooks and modes on every exit path ---------------------------------------------------------
def _hooks(*modules):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_forward_hooks_with_kwargs", {})) for mod in modules for m in mod.modules())


def _modes(*modules):
    return [m.training for mod in modules for m in mod.modules()]


class Boom(RuntimeError):
    pass


@pytest.fixture
def teacher_student(setup):
    from dfkd.detection.models import DetectionTeacher, load_detector
    from dfkd.detection.run import DetectionSettings, build_student_detector

    model = load_detector(setup["teacher"])
    teacher = DetectionTeacher(model)
    student = build_student_detector(model.dfkd_build, DetectionSettings())
    student.train()
    student.backbone.eval()  # mixed modes, to see they come back exactly
    return teacher, student


def test_exception_inside_box_inversion_step_leaves_no_hook(teacher_student, monkeypatch):
    from generators.box_inversion import BoxInversion

    teacher, student = teacher_student
    syn = BoxInversion(teacher, batch_size=2, iterations=3, adi=1.0, bn=0.05)
    before_hooks, before_modes = _hooks(teacher, student), _modes(teacher, student)
    assert before_hooks == 0
    calls = {"n": 0}
    real_loss = teacher.loss

    def loss(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # inside the optimisation loop, hooks (BN prior + head) registered
            assert _hooks(teacher) > 0
            raise Boom("inside the step")
        return real_loss(*a, **k)

    monkeypatch.setattr(teacher, "loss", loss)
    with pytest.raises(Boom):
        syn.step(student)
    assert _hooks(teacher, student) == 0 and _modes(teacher, student) == before_modes


def test_exception_inside_detection_loop_leaves_no_hook(teacher_student, monkeypatch):
    from dfkd.detection.train import distill_detector
    from generators.box_inversion import BoxNoise

    teacher, student = teacher_student
    before_modes = _modes(teacher, student)
    calls = {"n": 0}
    real_detect = teacher.detect

    def detect(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # a student step of the second round: head hooks registered, student in train mode
            assert _hooks(teacher, student) > 0 and student.backbone.training
            raise Boom("inside the loop")
        return real_detect(*a, **k)

    monkeypatch.setattr(teacher, "detect", detect)
    with pytest.raises(Boom):
        distill_detector(teacher, student, BoxNoise(teacher, batch_size=2), steps=10, batch_size=2,
                         kd_steps_per_round=2, class_kd=1.0, memory_size=8, progress=False)
    assert _hooks(teacher, student) == 0 and _modes(teacher, student) == before_modes


def test_exception_inside_detector_training_restores_modes(setup, monkeypatch):
    from dfkd.data.detection import load_detection
    from dfkd.detection.train import train_detector
    from dfkd.detection.models import load_detector

    model = load_detector(setup["teacher"])
    model.eval()
    model.head.train()
    before = _modes(model)
    train = load_detection(setup["train"])
    train.transform = lambda image, target: (image.mean(0, keepdim=True), target)
    real = model.forward
    calls = {"n": 0}

    def forward(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Boom("inside training")
        return real(*a, **k)

    monkeypatch.setattr(model, "forward", forward)
    with pytest.raises(Boom):
        train_detector(model, train, steps=5, batch_size=4, progress=False)
    assert _modes(model) == before and _hooks(model) == 0


def test_detector_config_holds_the_settings_defaults():
    """configs/teacher/detector.yaml lists every detection.* setting with DetectionSettings' default."""
    import dataclasses

    from omegaconf import OmegaConf

    from dfkd.detection.run import DetectionSettings

    cfg = composed("teacher=detector", "teacher.checkpoint=x")
    assert cfg.task.value == "detection" if hasattr(cfg.task, "value") else cfg.task == "detection"
    assert OmegaConf.to_container(cfg.detection) == dataclasses.asdict(DetectionSettings())


def _write_voc(ds, root, difficult_first=False):
    """The COCO-format dataset ``ds`` written as a Pascal VOC folder (1-based corners, as VOC has them)."""
    import shutil

    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    gt = ds.coco().dataset
    names = {c["id"]: c["name"] for c in gt["categories"]}
    stems = []
    for i, im in enumerate(gt["images"]):
        shutil.copy(ds.image_root / im["file_name"], root / "JPEGImages" / im["file_name"])
        objs = []
        for k, a in enumerate(x for x in gt["annotations"] if x["image_id"] == im["id"]):
            x, y, w, h = a["bbox"]
            diff = int(difficult_first and i == 0 and k == 0)
            objs.append(f"<object><name>{names[a['category_id']]}</name><difficult>{diff}</difficult><bndbox>"
                        f"<xmin>{x + 1}</xmin><ymin>{y + 1}</ymin><xmax>{x + w}</xmax><ymax>{y + h}</ymax>"
                        "</bndbox></object>")
        stem = im["file_name"].rsplit(".", 1)[0]
        stems.append(stem)
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{im['file_name']}</filename><size><width>{im['width']}</width>"
            f"<height>{im['height']}</height><depth>3</depth></size>{''.join(objs)}</annotation>")
    (root / "ImageSets" / "Main" / "val.txt").write_text("\n".join(stems[: len(stems) // 2]) + "\n")
    return root


def test_voc_folder_loads_and_evaluates_like_its_coco_source(setup, tmp_path):
    from dfkd.data.detection import load_detection
    from dfkd.detection.models import load_detector
    from dfkd.detection.run import DetectionSettings, load_eval_set, score_detector

    coco = load_detection(setup["val"])
    voc_root = _write_voc(coco, tmp_path / "voc")
    voc = load_detection(voc_root)
    assert voc.classes == coco.classes and len(voc) == len(coco) and voc.num_boxes == coco.num_boxes
    for i in range(len(coco)):
        (a, ta), (b, tb) = coco[i], voc[i]
        assert torch.equal(a, b) and torch.allclose(ta["boxes"], tb["boxes"]) and torch.equal(ta["labels"], tb["labels"])
    teacher = load_detector(setup["teacher"])
    s = DetectionSettings()
    via_voc = score_detector(teacher, load_eval_set({"name": "voc", "path": str(voc_root)}, None, 1), s, "cpu")
    via_coco = score_detector(teacher, load_eval_set({"name": "coco", "path": str(setup["val"])}, None, 1), s, "cpu")
    assert via_voc["map"] == pytest.approx(via_coco["map"]) and via_voc["map50"] == pytest.approx(via_coco["map50"])
    assert via_voc["num_images"] == len(coco)
    assert len(load_detection(voc_root, split="val")) == len(coco) // 2
    # a difficult object is a crowd region: not a training target, ignored when scoring
    hard = load_detection(_write_voc(coco, tmp_path / "voc_hard", difficult_first=True))
    assert len(hard[0][1]["boxes"]) == len(coco[0][1]["boxes"]) - 1
    with pytest.raises(DfkdError, match="no split 'test'"):
        load_detection(voc_root, split="test")
