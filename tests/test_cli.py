"""The commands users run: the default end to end (tiny), resume, and bad input → one line, exit 2.

The end-to-end test starts its commands as fresh interpreters (``run_cli``); the others run theirs in
processes forked from the command server (``run_forked``: the imports paid once, each command still
a process of its own running the console module as ``__main__``).
"""

import json
import signal

import pytest
import torch

from conftest import kill_after_checkpoint, run_cli, run_cli_many, run_forked

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
    """A cold teacher cache of the test's own."""
    return {"DFKD_CACHE": str(tmp_path / "cache")}


@pytest.fixture
def warm(digits_teacher_cache):
    """The session's teacher cache, the digits teacher of TINY already in it: runs start distilling."""
    return {"DFKD_CACHE": str(digits_teacher_cache)}


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


def test_finished_run_extends_on_resume(tmp_path, warm):
    run = tmp_path / "run"
    assert run_forked("dfkd-distill", *TINY, f"hydra.run.dir={run}", env=warm).returncode == 0
    first = (run / "metrics.jsonl").read_text().splitlines()
    r = run_forked("dfkd-distill", *TINY, "distill.rounds=6", f"hydra.run.dir={run}", env=warm)
    assert r.returncode == 0, r.stderr
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert lines[:4] == first  # rounds 1-4 were not run again: the second start continued at round 5
    assert "round 6/6" in r.stdout + r.stderr and "round 2/6" not in r.stdout + r.stderr


# Runs dfkd-distill and SIGKILLs its own process right after the round-3 checkpoint is on disk.
_KILL_AFTER_ROUND_3 = kill_after_checkpoint('st["round"] >= 3')


def test_sigkill_then_resume_finishes(tmp_path, warm):
    """Killed (SIGKILL: no handler runs) after its round-3 checkpoint, the same command continues from
    there: rounds 1-3 are not run again and the run ends at round 6."""
    run = tmp_path / "run"
    args = [a for a in TINY if not a.startswith("distill.rounds")] + ["distill.rounds=6", f"hydra.run.dir={run}"]
    killed = run_forked(*args, code=_KILL_AFTER_ROUND_3, env=warm)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert torch.load(run / "checkpoint.pt", weights_only=True)["round"] == 3
    assert not (run / "summary.json").exists()
    before = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in before] == [1, 2, 3]
    r = run_forked("dfkd-distill", *args, env=warm)
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr  # a line per evaluation (every 2nd round): 4 and 6 ran, 2 did not run again
    assert "round 4/6" in out and "round 6/6" in out and "round 2/6" not in out, out[-2000:]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == list(range(1, 7))
    assert lines[:3] == before  # rounds 1-3 are the killed run's lines, untouched
    assert json.loads((run / "summary.json").read_text())["rounds"] == 6


def _assert_clean_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    err = r.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err  # nothing else: no progress bars, no log lines
    for n in needles:
        assert n in err, err


def test_bad_inputs_give_one_line_and_exit_2(tmp_path, env):
    """Each bad input through the real command, each in a process of its own (``run_cli_many``)."""
    from dfkd.models import build_model

    missing, wrong = tmp_path / "missing.pt", tmp_path / "wrong.pt"
    torch.save(build_model("small_cnn", num_classes=10, in_chans=1, width=8).state_dict(), wrong)
    cases = [
        ([f"teacher.checkpoint={missing}"], ["checkpoint not found", "missing.pt"]),
        ([f"teacher.checkpoint={wrong}"], ["does not fit the model", "shape mismatch"]),
        (["student.model=vit_tiny_patch16_22"], ["unknown model", "vit_tiny_patch16_224"]),
        (["distill.lr=fast"], ["distill.lr"]),
        (["distill.optimizer=adan"], ["adamw", "sgd"]),
        (["synthesizer=deepinvrsion"], ["deepinversion"]),
        (["distill.roundz=3"], ["roundz"]),
        (["+synthesizer.iteratons=3"], ["iteratons", "iterations"]),
        (["device=tpu"], ["device"]),
    ]
    results = run_cli_many([("dfkd-distill", [*args, f"hydra.run.dir={tmp_path / f'r{i}'}"], env)
                            for i, (args, _) in enumerate(cases)])
    for (args, needles), r in zip(cases, results):
        _assert_clean_error(r, *needles)
    assert not (tmp_path / "cache" / "teachers").exists()  # every one found before a teacher was trained


def test_batchnorm_method_on_vit_teacher_is_a_clean_error(tmp_path, env):
    from dfkd.models import build_model

    kw = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=16, depth=1, num_heads=2)
    ckpt = tmp_path / "vit.pt"
    torch.save(build_model("vit_tiny_patch16_224", **kw).state_dict(), ckpt)
    overrides = ["teacher=timm", "teacher.model=vit_tiny_patch16_224", f"teacher.checkpoint={ckpt}",
                 "synthesizer.prior=batchnorm"]
    overrides += [f"+teacher.kwargs.{k}={v}" for k, v in kw.items() if k != "num_classes"]
    _assert_clean_error(run_forked("dfkd-distill", *overrides, env=env), "no BatchNorm")


def test_train_teacher_command(tmp_path, env):
    out = tmp_path / "t.safetensors"
    r = run_forked("dfkd-train-teacher", "teacher.train.epochs=2", f"output={out}", "progress=false",
                f"hydra.run.dir={tmp_path / 'run'}", env=env)
    assert r.returncode == 0, r.stderr
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["top1"] > 0.5


def test_channels_last_run(tmp_path, warm):
    run = tmp_path / "run"
    r = run_forked("dfkd-distill", *TINY, "student=small_cnn", "distill.channels_last=true", "distill.rounds=2",
                f"hydra.run.dir={run}", env=warm)
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "summary.json").read_text())["student_top1"] == _top1_from_saved_student(run)
