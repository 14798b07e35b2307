"""scripts/distill_detection.py: data-free detector distillation as one command, resumable.

A tiny teacher detector trained for a few steps on tiny digits canvases; every run is a few
optimizer steps on one CPU thread.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, load_script

SCRIPT = ROOT / "scripts" / "distill_detection.py"
TINY = ["--steps", "4", "--kd-steps-per-round", "2", "--inv-batch", "4", "--inv-iterations", "2", "--batch-size",
        "4", "--memory-size", "16", "--no-flip", "--checkpoint-every", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def script():
    return load_script("distill_detection")


def call(script, capsys, *args):
    rc = script.main([*map(str, args), "--no-progress", "--threads", "1"])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Digits canvases (RGB files) and a grayscale teacher detector trained on them for a few steps."""
    from dfkd.data.detection import build_canvas_benchmark, load_detection
    from dfkd.detection.models import build_detector, save_detector
    from dfkd.detection.train import train_detector

    root = tmp_path_factory.mktemp("distill_det")
    paths = build_canvas_benchmark("digits", root / "canvases", train_canvases=40, test_canvases=12)
    train = load_detection(paths["train"])
    train.transform = lambda image, target: (image.mean(0, keepdim=True), target)
    torch.manual_seed(0)
    teacher = build_detector("fcos", "small_cnn", num_classes=train.num_classes, image_size=32, in_chans=1,
                             mean=(0.4,), std=(0.3,), width=8, fpn_channels=16, head_convs=1)
    train_detector(teacher, train, steps=20, lr=3e-3, batch_size=8, progress=False)
    save_detector(teacher, root / "teacher.safetensors")
    return {"root": root, "teacher": root / "teacher.safetensors", "val": paths["test"]}


def test_runs_scores_and_resumes(script, setup, capsys, tmp_path):
    from dfkd.detection.models import load_detector

    out = tmp_path / "run"
    rc, stdout, err = call(script, capsys, "--teacher", setup["teacher"], "--out", out, "--val", setup["val"], *TINY)
    assert rc == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 4 and m["rounds"] == 2 and m["images_synthesized"] == 8 and m["class_kd"] == 2.0
    assert m["adi"] == 1.0 and "syn/adi_js" in json.loads((out / "history.jsonl").read_text().splitlines()[0])
    assert 0.0 <= m["map50"] <= 1.0 and 0.0 <= m["teacher_map50"] <= 1.0 and m["val_images"] == 12
    assert m["parameters"]["student"] < m["parameters"]["teacher"]
    assert "student mAP" in stdout
    student = load_detector(out / "student.safetensors")
    assert student.dfkd_build["in_chans"] == 1 and student.dfkd_build["width"] == 4  # half the teacher's
    assert len((out / "history.jsonl").read_text().splitlines()) == 2
    assert (out / "state.pt").is_file()

    # the same command with more steps continues the saved run
    tiny8 = [a if a != "4" or i != 1 else "8" for i, a in enumerate(TINY)]
    rc, _, err = call(script, capsys, "--teacher", setup["teacher"], "--out", out, *tiny8)
    assert rc == 0, err
    assert "resuming" in err and "at step 4" in err
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 8 and m["rounds"] == 4 and m["images_synthesized"] == 16
    rounds = [json.loads(line)["round"] for line in (out / "history.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3, 4]

    # other settings: one line, exit 2; --restart starts over
    rc, _, err = call(script, capsys, "--teacher", setup["teacher"], "--out", out, *tiny8, "--lr", "1e-3")
    assert rc == 2 and err.count("\n") == 1 and "other settings (lr" in err
    rc, _, err = call(script, capsys, "--teacher", setup["teacher"], "--out", out, *TINY, "--lr", "1e-3", "--restart")
    assert rc == 0, err
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4


def test_other_student_geometry_runs_without_adi(script, setup, capsys, tmp_path):
    out = tmp_path / "resnet"
    rc, _, err = call(script, capsys, "--teacher", setup["teacher"], "--out", out, *TINY,
                      "--student-backbone", "resnet8_cifar")
    assert rc == 0, err
    assert "--adi needs a student head of the teacher's geometry" in err
    assert json.loads((out / "metrics.json").read_text())["adi"] == 0.0


@pytest.mark.parametrize("args, message", [
    (["--teacher", "nope.safetensors"], "detector checkpoint not found"),
    (["--box-size", "0.6", "0.2"], "--box-size needs 0 < MIN <= MAX <= 1"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--method", "diffusion"], "invalid choice"),
])
def test_bad_input_is_one_line(script, setup, capsys, tmp_path, args, message):
    argv = ["--teacher", setup["teacher"], "--out", tmp_path / "o", *TINY]
    if args[0] == "--teacher":
        argv[1] = tmp_path / args[1]
        args = []
    rc, _, err = call(script, capsys, *argv, *args)
    assert rc == 2 and err.count("\n") == 1 and message in err, err


def test_sigkill_then_resume(setup, tmp_path):
    """Killed mid-run (SIGKILL: no handler runs), the same command continues from the last saved round."""
    out = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    long = [a if a != "4" or i != 1 else "100000" for i, a in enumerate(TINY)]
    cmd = [sys.executable, str(SCRIPT), "--teacher", str(setup["teacher"]), "--out", str(out), "--no-progress",
           "--threads", "1"]
    p = subprocess.Popen(cmd + long, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = out / "state.pt"
    deadline = time.time() + 300
    try:
        while time.time() < deadline and not (state.is_file() and len((out / "history.jsonl").read_text().splitlines()) >= 3):
            time.sleep(0.2)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert state.is_file(), p.stderr.read().decode()
    saved = torch.load(state, map_location="cpu", weights_only=False)["run"]["step"]
    assert saved >= 4 and not (out / "metrics.json").exists()
    target = saved + 4
    run = subprocess.run(cmd + [a if a != "100000" else str(target) for a in long], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    assert f"at step {saved}" in run.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == target
