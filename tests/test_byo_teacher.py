"""Bring your own teacher: a timm training checkpoint, an image folder of another size, the real commands."""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, run_cli_many, run_forked

TINY = ["distill.rounds=2", "distill.kd_steps=3", "distill.eval_every=1", "distill.batch_size=16",
        "synthesizer.iterations=2", "synthesizer.batch_size=8", "progress=false", "threads=1"]
VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)


def cli(module: str, *args, env=None, timeout=300):
    full = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=full,
                          timeout=timeout, cwd=str(ROOT))


def clean_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    err = r.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


def timm_training_checkpoint(path, num_classes=3, seed=0):
    """What timm's train.py writes: args (a Namespace), state_dict and state_dict_ema (differing)."""
    import timm

    torch.manual_seed(seed)
    ema = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **VIT)
    raw = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **VIT)
    with torch.no_grad():
        ema.head.weight.mul_(20)  # confident, so that the EMA's predictions differ from the raw weights'
    args = argparse.Namespace(model="vit_tiny_patch16_224", num_classes=num_classes, img_size=32, in_chans=None,
                              input_size=None, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], interpolation="bilinear",
                              crop_pct=1.0, model_kwargs={k: v for k, v in VIT.items() if k != "img_size"},
                              lr=0.1, epochs=3, model_ema=True)
    torch.save({"epoch": 3, "arch": "vit_tiny_patch16_224", "state_dict": raw.state_dict(),
                "state_dict_ema": ema.state_dict(), "optimizer": {"state": {}, "param_groups": []},
                "version": 2, "args": args, "metric": 0.5}, path)
    return ema.eval(), raw.eval()


def image_folder(root, classes=("cat", "dog", "fish"), per_class=6, size=40, seed=0):
    rng = np.random.default_rng(seed)
    for k, c in enumerate(classes):
        d = root / c
        d.mkdir(parents=True)
        for i in range(per_class):
            img = (rng.random((size, size, 3)) * 255).astype(np.uint8)
            img[..., k % 3] = 255 - k * 40  # a class-dependent tint
            Image.fromarray(img).save(d / (f"{i}.png" if i % 2 else f"{i}.jpg"), quality=95)
    return root


def test_timm_checkpoint_and_image_folder_through_the_commands(tmp_path):
    ckpt = tmp_path / "last.pth.tar"
    ema, raw = timm_training_checkpoint(ckpt)
    folder = image_folder(tmp_path / "test")
    (folder / "cat" / "notes.txt").write_text("not an image")       # ignored: no image extension
    (folder / "dog" / "broken.png").write_bytes(b"\x89PNG garbage")  # skipped and counted
    run = tmp_path / "run"
    # dfkd-distill, then dfkd-eval on its run folder and on the teacher: each in a process of its own
    r, e, t = run_cli_many([
        ("dfkd-distill", ["teacher=timm", "teacher.model=vit_tiny_patch16_224", f"teacher.checkpoint={ckpt}",
                          "data=image_folder", f"data.path={folder}", *TINY, f"hydra.run.dir={run}"]),
        ("dfkd-eval", [f"model={run}", "threads=1"]),
        ("dfkd-eval", ["teacher=timm", "teacher.model=vit_tiny_patch16_224", f"teacher.checkpoint={ckpt}",
                       "data=image_folder", f"data.path={folder}", f"output={tmp_path / 'teval'}", "threads=1",
                       f"hydra.run.dir={tmp_path / 'h'}"])])
    assert r.returncode == 0, r.stderr[-3000:]
    for row in ("teacher top-1", "student top-1", "teacher params", "student params", "compression"):
        assert row in r.stdout, r.stdout
    assert "EMA weights" in r.stdout + r.stderr
    summary = json.loads((run / "summary.json").read_text())
    spec = summary["teacher_spec"]
    assert spec["input_size"] == [3, 32, 32] and spec["num_classes"] == 3
    assert spec["sources"]["input_size"] == "checkpoint args" and spec["mean"] == [0.5, 0.5, 0.5]
    assert summary["test_set"]["images"] == 18  # the 18 readable images; the broken one skipped
    assert summary["student_params"] < summary["teacher_params"]
    # the teacher's top-1 is the EMA weights' on the folder as the teacher sees it (resize 40 -> 32)
    from dfkd.data.folder import scan_image_folder
    from dfkd.eval.classification import evaluate
    from dfkd.spec import TeacherSpec
    from dfkd.teacher import Normalized

    ts = TeacherSpec((3, 32, 32), 3, [0.5] * 3, [0.25] * 3, "bilinear", 1.0)
    data = scan_image_folder(folder, workers=0)
    data.test.set_transform(ts.eval_transform())
    want = evaluate(Normalized(ema, ts.mean, ts.std, ts.input_size, 3), data.test)["top1"]
    other = evaluate(Normalized(raw, ts.mean, ts.std, ts.input_size, 3), data.test)["top1"]
    assert summary["teacher_top1"] == pytest.approx(want)
    assert want != other  # so the line above tells EMA from raw weights
    # dfkd-eval on the run folder: the same test set, the same top-1, to the last digit
    assert e.returncode == 0, e.stderr[-2000:]
    ev = json.loads((run / "eval.json").read_text())
    assert ev["top1"] == summary["student_top1"] and ev["images"] == 18
    assert (run / "confusion.png").is_file() and len(ev["confusion"]) == 3
    # and the teacher through dfkd-eval's teacher path
    assert t.returncode == 0, t.stderr[-2000:]
    assert json.loads((tmp_path / "teval" / "eval.json").read_text())["top1"] == pytest.approx(want)


def test_data_none_is_purely_data_free(tmp_path):
    ckpt = tmp_path / "last.pth.tar"
    timm_training_checkpoint(ckpt)
    run = tmp_path / "run"
    r = run_forked("dfkd-distill", "teacher=timm", "teacher.model=vit_tiny_patch16_224", f"teacher.checkpoint={ckpt}",
                   "data=none", *TINY, f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no test data" in r.stdout
    s = json.loads((run / "summary.json").read_text())
    assert s["teacher_top1"] is None and s["student_top1"] is None and s["test_set"] is None
    assert s["synthesis"] and "syn/loss" in s["synthesis"]
    assert (run / "student.safetensors").is_file() and (run / "samples.png").is_file()
    import dfkd

    student = dfkd.load_student(run)
    assert student.spec.input_size == (3, 32, 32)
    assert student(torch.rand(2, 3, 32, 32)).shape == (2, 3)


def test_folder_class_names_map_to_the_teachers(tmp_path):
    """A folder with a subset of the teacher's classes evaluates on that subset, by name."""
    from dfkd.data import fit_to_teacher, load_dataset
    from dfkd.errors import DfkdError
    from dfkd.spec import TeacherSpec

    folder = image_folder(tmp_path / "f", classes=("dog", "cat"), per_class=2, size=12)
    ts = TeacherSpec((1, 8, 8), 4, [0.5], [0.5], class_names=["bird", "cat", "deer", "dog"])
    data = fit_to_teacher(load_dataset("image_folder", path=folder), ts)
    data.test.workers = 0
    x, y = next(data.test.batches(8))
    assert x.shape == (4, 1, 8, 8) and sorted(y.tolist()) == [1, 1, 3, 3]
    with pytest.raises(DfkdError, match="'fish' is not one of the teacher's classes"):
        fit_to_teacher(load_dataset("image_folder", path=image_folder(tmp_path / "g", classes=("cat", "fish"),
                                                                      per_class=1, size=8)), ts)
    with pytest.raises(DfkdError, match="has 2 classes, the teacher 4 and no class names"):
        fit_to_teacher(load_dataset("image_folder", path=folder), TeacherSpec((1, 8, 8), 4, [0.5], [0.5]))


def shared():
    p = os.environ.get("DFKD_DATA")
    from pathlib import Path

    return Path(p) if p and Path(p).is_dir() else None


# The shared ViT's published 56.97 % is over all 10,000 test images (5,697 correct, reproduced by
# converting it and scoring the npz in-process). Exporting and scoring 10,000 PNGs through dfkd-eval
# took ~35 s, so the folder holds every 10th test image (1,000, 100 per class; the file is ordered by
# class), scored against the same subset's figures from that in-process evaluation: 566 correct (0.2
# binomial standard errors from 56.97 %), mean cross-entropy 2.3179123. tests/test_vit_convert.py
# checks the same subset figures in-process.
ASHU_SUBSET = {"stride": 10, "correct": 566, "loss": 2.3179123}


@pytest.mark.skipif(shared() is None, reason="needs the shared data (set DFKD_DATA)")
def test_third_party_vit_scores_its_published_accuracy_through_dfkd_eval(tmp_path):
    """The shared nn.MultiheadAttention ViT (someone else's, 56.97 % on CIFAR-10 test): converted with
    dfkd-convert, scored by dfkd-eval on a PNG image folder exported from (every 10th image of) the
    npz test set."""
    from dfkd.data.folder import export_npz_folder

    root = shared()
    conv = tmp_path / "vit_ashu.safetensors"
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with np.load(root / "cifar10/cifar10_test.npz") as z:
        step = ASHU_SUBSET["stride"]
        assert len(z["labels"]) == 10_000
        np.savez(tmp_path / "subset.npz", images=z["images"][::step], labels=z["labels"][::step], classes=z["classes"])
    folder = tmp_path / "cifar10_test"
    assert export_npz_folder(tmp_path / "subset.npz", folder) == 1000
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == sorted(names)
    # the two commands, one after the other, each in a process of its own
    r, e = run_cli_many([
        ("dfkd.models.convert", [root / "teachers/vit_cifar10_ashu/vit_model.pth", conv, "--num-heads", "4",
                                 "--mean", "0", "0", "0", "--std", "1", "1", "1", "--class-names", *names]),
        ("dfkd-eval", ["teacher=checkpoint", f"teacher.checkpoint={conv}", "data=image_folder", f"data.path={folder}",
                       f"output={tmp_path / 'eval'}", f"hydra.run.dir={tmp_path / 'h'}"])])
    assert r.returncode == 0, r.stderr
    assert e.returncode == 0, e.stderr[-2000:]
    ev = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert ev["images"] == 1000
    assert ev["top1"] == ASHU_SUBSET["correct"] / 1000, ev["top1"]
    assert ev["loss"] == pytest.approx(ASHU_SUBSET["loss"], rel=2e-5)
    assert abs(ASHU_SUBSET["correct"] / 1000 - 0.5697) <= 3 * (0.5697 * 0.4303 / 1000) ** 0.5


def test_lightning_and_prefixed_checkpoints_load_and_say_which_weights(tmp_path):
    from dfkd.models import build_model
    from dfkd.models.checkpoint import load_checkpoint_into, read_checkpoint

    net = build_model("small_cnn", num_classes=4, in_chans=3, width=4)
    sd = net.state_dict()
    ckpt = tmp_path / "epoch=3.ckpt"  # Lightning: the LightningModule kept the network as self.model
    torch.save({"state_dict": {**{f"model.{k}": v for k, v in sd.items()}, "criterion.weight": torch.ones(4)},
                "hyper_parameters": {"lr": 0.1, "width": 4}, "epoch": 3, "global_step": 30}, ckpt)
    fresh = build_model("small_cnn", num_classes=4, in_chans=3, width=4)
    used = load_checkpoint_into(fresh, ckpt)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in sd.items())
    assert "prefix 'model.' stripped" in used.source and used.meta["hyper_parameters"]["lr"] == 0.1
    # without the prefix rule the keys would not fit: the same file into a model that lacks them fails clearly
    from dfkd.errors import DfkdError

    with pytest.raises(DfkdError, match="does not fit the model"):
        load_checkpoint_into(build_model("small_cnn", num_classes=4, in_chans=3, width=8), ckpt)
    ddp = tmp_path / "ddp.pt"
    torch.save({f"module._orig_mod.{k}": v for k, v in sd.items()}, ddp)
    assert set(read_checkpoint(ddp)) == set(sd)


def test_npz_test_set_of_any_class_count_fits_the_teacher(tmp_path):
    from dfkd.data import fit_to_teacher, load_dataset
    from dfkd.spec import TeacherSpec

    rng = np.random.default_rng(0)
    f = tmp_path / "my_test.npz"
    np.savez(f, images=(rng.random((12, 20, 20, 3)) * 255).astype(np.uint8), labels=np.arange(12) % 12,
             classes=np.array([f"c{i}" for i in range(12)]))
    raw = load_dataset("npz", path=f, train=False)
    assert raw.num_classes == 12 and raw.input_size == (3, 20, 20)
    ts = TeacherSpec((1, 16, 16), 12, [0.5], [0.5], "bilinear", 1.0, [f"c{i}" for i in reversed(range(12))])
    data = fit_to_teacher(raw, ts)
    x, y = next(data.test.batches(12))
    assert x.shape == (12, 1, 16, 16) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert y.tolist() == [11 - i for i in range(12)]  # mapped by name to the teacher's (reversed) order
