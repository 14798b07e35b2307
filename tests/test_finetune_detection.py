"""dfkd-finetune-detection (dfkd.cli.finetune_detection): a distilled classification backbone fine-tuned for detection.

Tiny digits canvas sets and tiny students; every run is a few optimizer steps on one CPU thread.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import shared_data

COMMAND = [sys.executable, "-m", "dfkd.cli.finetune_detection"]
LUMA = torch.tensor([0.299, 0.587, 0.114])
VIT_KW = {"num_classes": 10, "img_size": 8, "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 1,
          "num_heads": 2, "global_pool": "avg", "class_token": False}


def run_script(*args, timeout=240) -> subprocess.CompletedProcess:
    """The command in a process of its own, forked from the command server (torch already imported)."""
    from conftest import run_forked

    return run_forked("dfkd.cli.finetune_detection", *args, "--no-progress", "--threads", "1",
                      env={"OMP_NUM_THREADS": "1"}, timeout=timeout)


pytestmark = pytest.mark.usefixtures("one_thread")


def call(script, capsys, *args):
    """``main(argv)`` in this process (the imports are already paid for): (exit code, stdout, stderr)."""
    rc = script.main([*map(str, args), "--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def script():
    """The command's module, to call main(argv) in-process for the fast bad-input cases."""
    from dfkd.cli import finetune_detection

    return finetune_detection


@pytest.fixture(scope="module")
def canvases(tmp_path_factory):
    from dfkd.data.detection import build_canvas_benchmark

    return build_canvas_benchmark("digits", tmp_path_factory.mktemp("canvases"), train_canvases=40, test_canvases=20)


def save_student(model, folder: Path, name: str, kwargs: dict, in_chans: int) -> Path:
    """What dfkd-distill writes: student.safetensors + student.json (model, kwargs, normalisation)."""
    from dfkd.models.checkpoint import save_model

    path = folder / "student.safetensors"
    save_model(model, path, build={"model": name, "kwargs": kwargs, "mean": [0.3] * in_chans, "std": [0.4] * in_chans,
                                   "input_size": [in_chans, 8, 8], "num_classes": 10})
    return path


@pytest.fixture(scope="module")
def small_cnn_run(tmp_path_factory):
    """A digits-like small_cnn student (1 channel) with non-trivial BatchNorm statistics, as a run folder."""
    from dfkd.models import build_model

    torch.manual_seed(0)
    kwargs = {"num_classes": 10, "in_chans": 1, "width": 8}
    m = build_model("small_cnn", **kwargs).train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.rand(16, 1, 8, 8))
    run = tmp_path_factory.mktemp("run")
    save_student(m.eval(), run, "small_cnn", kwargs, 1)
    return run


def read_ckpt(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def check_metrics(out: Path, num_classes: int = 10) -> dict:
    m = json.loads((out / "metrics.json").read_text())
    assert {"map", "map50", "map75", "per_class", "hardware", "wall_seconds", "command"} <= set(m)
    assert 0.0 <= m["map"] <= m["map50"] <= 1.0
    assert len(m["per_class"]) <= num_classes and m["interrupted"] is None
    assert m["command"].startswith("dfkd-finetune-detection ")
    lines = (out / "history.jsonl").read_text().splitlines()
    assert lines and "loss" in json.loads(lines[-1])
    return m


def test_small_cnn_student_frozen(canvases, small_cnn_run, tmp_path):
    from dfkd.detection.models import load_detector

    out = tmp_path / "out"
    r = run_script("--backbone", small_cnn_run, "--train", canvases["train"], "--val", canvases["test"],
                   "--steps", 3, "--batch-size", 8, "--freeze-backbone", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "mAP@.5" in r.stdout and "images/s" in r.stdout and "wall time" in r.stdout
    m = check_metrics(out)
    assert m["data"]["val_is_train"] is False and m["data"]["image_size"] == 48
    assert m["backbone"]["detector_backbone"] == "small_cnn_cls" and m["backbone"]["frozen"]
    assert m["train"]["steps"] == 3

    det = load_detector(out / "detector.safetensors")
    with torch.no_grad():
        preds = det([torch.rand(3, 48, 48)])
    assert set(preds[0]) == {"boxes", "scores", "labels"}
    # the backbone holds the checkpoint's weights (and BatchNorm statistics) after training
    ckpt = read_ckpt(small_cnn_run / "student.safetensors")
    own = det.backbone.body.net.state_dict()
    assert "head.weight" in ckpt and not any(k.startswith("head.") for k in own)
    for k, v in own.items():
        if k == "features.0.0.weight":  # 1-channel stem → RGB with luma weights: sums back to the original
            assert v.shape[1] == 3 and torch.allclose(v, ckpt[k] * LUMA.view(1, 3, 1, 1))
        else:
            assert torch.equal(v, ckpt[k]), k
    build = json.loads((out / "detector.json").read_text())
    assert build["backbone"] == "small_cnn_cls" and build["in_chans"] == 3


def test_resnet_bare_checkpoint_trains_from_its_weights(canvases, tmp_path, script, capsys):
    from dfkd.detection.models import load_detector
    from dfkd.models.resnet_cifar import ResNetCifar

    torch.manual_seed(1)
    cls = ResNetCifar(depth=8, num_classes=10)
    torch.save({"state_dict": {f"module.{k}": v for k, v in cls.state_dict().items()}}, tmp_path / "r8.th")
    out = tmp_path / "out"
    rc, _, err = call(script, capsys, "--backbone", tmp_path / "r8.th", "--backbone-name", "resnet20_cifar",
                      "--backbone-kwargs", '{"depth": 8}', "--train", canvases["train"], "--val", canvases["test"],
                      "--steps", 2, "--batch-size", 8, "--max-images", 16, "--out", out)
    assert rc == 0, err
    check_metrics(out)
    det = load_detector(out / "detector.safetensors")
    assert det.dfkd_build["backbone"] == "resnet8_cifar"
    w, w0 = det.backbone.body.net.layer2[0].conv1.weight, cls.layer2[0].conv1.weight
    assert not torch.equal(w, w0)  # trained (not frozen) ...
    assert (w - w0).abs().max() < 0.01  # ... starting from the checkpoint, not from a random init


def test_vit_student_pos_embed_resampled(canvases, tmp_path, script, capsys):
    from timm.layers import resample_abs_pos_embed

    from dfkd.detection.models import load_detector
    from dfkd.models import build_model

    torch.manual_seed(2)
    vit = build_model("vit_tiny_patch16_224", **VIT_KW)
    path = save_student(vit, tmp_path, "vit_tiny_patch16_224", VIT_KW, 1)
    out = tmp_path / "out"
    rc, _, err = call(script, capsys, "--backbone", path, "--train", canvases["train"], "--steps", 2,
                      "--batch-size", 8, "--max-images", 16, "--freeze-backbone", "--out", out)
    assert rc == 0, err
    assert "not a held-out score" in err
    m = check_metrics(out)
    assert m["data"]["val_is_train"] is True
    assert any("pos_embed resampled from a 2x2 to a 12x12" in n for n in m["backbone"]["adaptations"])
    det = load_detector(out / "detector.safetensors")
    v = det.backbone.body.vit
    ckpt = read_ckpt(path)
    assert torch.allclose(v.pos_embed, resample_abs_pos_embed(ckpt["pos_embed"], [12, 12], [2, 2], num_prefix_tokens=0))
    assert torch.allclose(v.patch_embed.proj.weight, ckpt["patch_embed.proj.weight"] * LUMA.view(1, 3, 1, 1))
    assert torch.equal(v.blocks[0].attn.qkv.weight, ckpt["blocks.0.attn.qkv.weight"])


def test_from_scratch_baseline(canvases, tmp_path, script, capsys):
    out = tmp_path / "out"
    rc, _, err = call(script, capsys, "--backbone", "none", "--backbone-name", "small_cnn", "--backbone-kwargs",
                      '{"width": 8}', "--train", canvases["train"], "--val", canvases["test"], "--steps", 1,
                      "--batch-size", 8, "--max-images", 8, "--out", out)
    assert rc == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["backbone"]["weights_loaded"] is False and m["detector"]["backbone"] == "small_cnn_cls"


def test_bad_input_in_a_real_process_is_one_line(canvases, tmp_path):
    """Exit 2 and one line on stderr, no traceback, from the script itself."""
    r = run_script("--backbone", tmp_path / "nope", "--train", canvases["train"], "--out", tmp_path / "o")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"dfkd-finetune-detection: error: backbone not found: {tmp_path / 'nope'}"]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case,message", [
    ("missing_backbone", "backbone not found"),
    ("missing_data", "detection data not found"),
    ("wrong_model", "does not fit backbone"),
    ("wrong_width", "shape mismatch(es), e.g. features.0.0.weight"),
    ("no_name", "--backbone-name"),
    ("none_no_name", "needs --backbone-name"),
    ("unknown_model", "unknown classification model"),
    ("bad_kwargs", "not valid JSON"),
    ("bad_size", "must be a multiple of 4"),
    ("no_student", "without student.safetensors"),
    ("missing_arg", "required: --train"),
    ("freeze_none", "--freeze-backbone needs"),
])
def test_bad_input_exits_2_with_one_line(case, message, canvases, small_cnn_run, tmp_path, script, capsys):
    train = str(canvases["train"])
    wide = tmp_path / "wide"  # the run's weights with a sidecar that describes another width
    wide.mkdir()
    (wide / "student.safetensors").write_bytes((small_cnn_run / "student.safetensors").read_bytes())
    meta = json.loads((small_cnn_run / "student.json").read_text())
    (wide / "student.json").write_text(json.dumps({**meta, "kwargs": {**meta["kwargs"], "width": 16}}))
    bare = tmp_path / "bare.pt"
    torch.save({"conv1.weight": torch.zeros(16, 3, 3, 3)}, bare)
    args = {
        "missing_backbone": ["--backbone", str(tmp_path / "nope.safetensors"), "--train", train],
        "missing_data": ["--backbone", str(small_cnn_run), "--train", str(tmp_path / "no_such_set")],
        "wrong_model": ["--backbone", str(small_cnn_run), "--backbone-name", "resnet20_cifar", "--train", train],
        "wrong_width": ["--backbone", str(wide), "--train", train],
        "no_name": ["--backbone", str(bare), "--train", train],
        "none_no_name": ["--backbone", "none", "--train", train],
        "unknown_model": ["--backbone", "none", "--backbone-name", "smal_cnn", "--train", train],
        "bad_kwargs": ["--backbone", "none", "--backbone-name", "small_cnn", "--backbone-kwargs", "{width: 8",
                       "--train", train],
        "bad_size": ["--backbone", str(small_cnn_run), "--train", train, "--image-size", "50"],
        "no_student": ["--backbone", str(tmp_path), "--train", train],
        "missing_arg": ["--backbone", str(small_cnn_run)],
        "freeze_none": ["--backbone", "none", "--backbone-name", "small_cnn", "--train", train, "--freeze-backbone"],
    }[case]
    rc, _, err = call(script, capsys, *args, "--out", tmp_path / "out")
    err = err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("dfkd-finetune-detection: error: ") and message in err[0], err
    assert not (tmp_path / "out" / "detector.safetensors").exists()


def test_ctrl_c_saves_and_exits_130(canvases, small_cnn_run, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [*COMMAND, "--backbone", str(small_cnn_run), "--train", str(canvases["train"]),
           "--steps", "100000", "--batch-size", "4", "--log-every", "1", "--no-progress", "--threads", "1",
           "--out", str(out)]
    # SIGINT back to its default in the child: a test run started in the background (``cmd &`` in a
    # script) inherits SIGINT ignored, and the child would ignore the Ctrl-C this test sends
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        hist = out / "history.jsonl"
        while time.time() < deadline and p.poll() is None:
            if hist.is_file() and hist.read_text().count("\n") >= 2:
                break
            time.sleep(0.2)
        assert p.poll() is None, p.stderr.read()
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=180)  # a loaded CI machine: the exit includes saving and scoring
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "interrupted after" in err and "no resume" in err
    m = json.loads((out / "metrics.json").read_text())
    assert m["interrupted"] == "training" and m["train"]["steps"] >= 2
    assert (out / "detector.safetensors").is_file() and (out / "detector.json").is_file()


def test_coco128_end_to_end(small_cnn_run, tmp_path, script, capsys):
    data = shared_data()
    coco = data / "detection" / "coco128" if data else None
    if coco is None or not (coco / "images").is_dir():
        pytest.skip("coco128 not available: set DFKD_DATA to a folder holding detection/coco128")
    out = tmp_path / "out"
    rc, stdout, err = call(script, capsys, "--backbone", small_cnn_run, "--train", coco, "--max-images", 16,
                           "--image-size", 64, "--steps", 2, "--batch-size", 4, "--out", out)
    assert rc == 0, err
    assert "mAP@[.5:.95]" in stdout
    m = check_metrics(out, num_classes=80)
    assert m["data"]["train_images"] == 16 and m["eval"]["num_images"] == 16
    assert len(m["data"]["classes"]) == 80 and "person" in m["data"]["classes"]
