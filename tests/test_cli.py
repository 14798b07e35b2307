"""The commands users run: the default end to end (tiny), resume, and bad input → one line, exit 2."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run_cli

TINY = [
    "teacher.train.epochs=3", "distill.rounds=4", "distill.kd_steps=2", "distill.eval_every=2",
    "distill.checkpoint_every=1", "synthesizer.iterations=3", "synthesizer.batch_size=32",
    "distill.batch_size=32", "progress=false", "threads=1",
]


def _top1_from_saved_student(run):
    """Top-1 of the student the run saved, recomputed on the digits test split (as the run splits it)."""
    import dfkd
    from dfkd.data import load_dataset
    from dfkd.eval.classification import evaluate

    return evaluate(dfkd.load_student(run), load_dataset("digits", train=False).test)["top1"]


@pytest.fixture
def env(tmp_path):
    return {"DFKD_CACHE": str(tmp_path / "cache")}


def test_default_run_end_to_end(tmp_path, env):
    run = tmp_path / "run"
    r = run_cli("dfkd-distill", *TINY, f"hydra.run.dir={run}", env=env)
    assert r.returncode == 0, r.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert 0.9 <= summary["teacher_top1"] <= 1.0  # the cached digits teacher (3 epochs)
    assert summary["student_top1"] == _top1_from_saved_student(run)  # the figure is the saved student's
    assert summary["wall_seconds"] > 0 and summary["rounds"] == 4
    for name in ("student.safetensors", "student.json", "samples.png", "metrics.jsonl", "config.json",
                 ".hydra/config.yaml"):
        assert (run / name).is_file(), name
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2, 3, 4]
    assert "test/top1" in lines[1] and "test/top1" in lines[3]
    assert "student top-1" in r.stdout and "teacher top-1" in r.stdout
    # the student reloads from what the run wrote
    from dfkd.models import build_model

    build = json.loads((run / "student.json").read_text())
    build_model(build["model"], checkpoint=run / "student.safetensors", **build["kwargs"])
    # the teacher was cached: a second run does not train it again
    cached = list((tmp_path / "cache" / "teachers").glob("*.safetensors"))
    assert len(cached) == 1
    again = run_cli("dfkd-distill", *TINY, f"hydra.run.dir={tmp_path / 'again'}", env=env)
    assert again.returncode == 0, again.stderr
    out = again.stdout + again.stderr
    assert "teacher: cached" in out and "teacher: training" not in out


def test_finished_run_extends_on_resume(tmp_path, env):
    run = tmp_path / "run"
    assert run_cli("dfkd-distill", *TINY, f"hydra.run.dir={run}", env=env).returncode == 0
    first = (run / "metrics.jsonl").read_text().splitlines()
    r = run_cli("dfkd-distill", *TINY, "distill.rounds=6", f"hydra.run.dir={run}", env=env)
    assert r.returncode == 0, r.stderr
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert lines[:4] == first  # rounds 1-4 were not run again: the second start continued at round 5
    assert "round 6/6" in r.stdout + r.stderr and "round 2/6" not in r.stdout + r.stderr


def test_sigkill_then_resume_finishes(tmp_path, env):
    """Kill the process mid-run; the same command continues from the last checkpoint."""
    run = tmp_path / "run"
    args = [a for a in TINY if not a.startswith(("distill.rounds", "synthesizer.iterations"))]
    args += ["distill.rounds=30", "synthesizer.iterations=20", f"hydra.run.dir={run}"]
    cmd = [sys.executable, "-m", "dfkd.cli.distill", *args]
    full_env = {**os.environ, **env}
    # warm the teacher cache so the kill lands during distillation
    assert run_cli("dfkd-distill", *TINY, f"hydra.run.dir={tmp_path / 'warm'}", env=env).returncode == 0
    p = subprocess.Popen(cmd, env=full_env, cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline:
        if ckpt.is_file() and torch.load(ckpt, weights_only=True)["round"] >= 3:
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = torch.load(ckpt, weights_only=True)["round"]
    assert 3 <= killed_at < 30, "the run finished before it could be killed"
    r = subprocess.run(cmd, env=full_env, cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rounds = [json.loads(x)["round"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rounds == list(range(1, 31))
    assert json.loads((run / "summary.json").read_text())["rounds"] == 30


def _assert_clean_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    err = r.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err  # nothing else: no progress bars, no log lines
    for n in needles:
        assert n in err, err


def test_bad_inputs_give_one_line_and_exit_2(tmp_path, env):
    missing = tmp_path / "missing.pt"
    _assert_clean_error(run_cli("dfkd-distill", f"teacher.checkpoint={missing}", env=env),
                        "checkpoint not found", "missing.pt")
    wrong = tmp_path / "wrong.pt"
    from dfkd.models import build_model

    torch.save(build_model("small_cnn", num_classes=10, in_chans=1, width=8).state_dict(), wrong)
    _assert_clean_error(run_cli("dfkd-distill", f"teacher.checkpoint={wrong}", env=env),
                        "does not fit the model", "shape mismatch")
    _assert_clean_error(run_cli("dfkd-distill", "student.model=vit_tiny_patch16_22", env=env),
                        "unknown model", "vit_tiny_patch16_224")
    _assert_clean_error(run_cli("dfkd-distill", "distill.lr=fast", env=env), "distill.lr")
    _assert_clean_error(run_cli("dfkd-distill", "distill.optimizer=adan", env=env), "adamw", "sgd")
    _assert_clean_error(run_cli("dfkd-distill", "synthesizer=deepinvrsion", env=env), "deepinversion")
    _assert_clean_error(run_cli("dfkd-distill", "distill.roundz=3", env=env), "roundz")
    _assert_clean_error(run_cli("dfkd-distill", "+synthesizer.iteratons=3", env=env),
                        "iteratons", "iterations")
    _assert_clean_error(run_cli("dfkd-distill", "device=tpu", env=env), "device")


def test_batchnorm_method_on_vit_teacher_is_a_clean_error(tmp_path, env):
    from dfkd.models import build_model

    kw = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=16, depth=1, num_heads=2)
    ckpt = tmp_path / "vit.pt"
    torch.save(build_model("vit_tiny_patch16_224", **kw).state_dict(), ckpt)
    overrides = ["teacher=timm", "teacher.model=vit_tiny_patch16_224", f"teacher.checkpoint={ckpt}",
                 "synthesizer.prior=batchnorm"]
    overrides += [f"+teacher.kwargs.{k}={v}" for k, v in kw.items() if k != "num_classes"]
    _assert_clean_error(run_cli("dfkd-distill", *overrides, env=env), "no BatchNorm")


def test_train_teacher_command(tmp_path, env):
    out = tmp_path / "t.safetensors"
    r = run_cli("dfkd-train-teacher", "teacher.train.epochs=2", f"output={out}", "progress=false",
                f"hydra.run.dir={tmp_path / 'run'}", env=env)
    assert r.returncode == 0, r.stderr
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["top1"] > 0.5


def test_channels_last_run(tmp_path, env):
    run = tmp_path / "run"
    r = run_cli("dfkd-distill", *TINY, "student=small_cnn", "distill.channels_last=true", "distill.rounds=2",
                f"hydra.run.dir={run}", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "summary.json").read_text())["student_top1"] == _top1_from_saved_student(run)
