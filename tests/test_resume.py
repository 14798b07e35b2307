"""Resume equivalence: with a round (step) budget and no wall-clock budget, a run killed after a
checkpoint and started again with the same command ends exactly where the uninterrupted run ends —
the same student weights (``dfkd.dist.tensor_digest``), the same memory and the same metrics.

Every test also checks that the second start really resumed (it ran only the rounds after the
checkpoint): with fixed seeds a run that silently starts over from round 1 would end with the same
digests too.
"""

import json

import pytest
import torch

from dfkd.dist import tensor_digest

pytestmark = pytest.mark.usefixtures("one_thread")


class Killed(Exception):
    """Stands in for the process dying (SIGKILL, power loss) at a chosen point."""


def _metrics(run_dir):
    """metrics.jsonl without the wall-clock field (the only one that may differ)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "wall"} for r in rows]


def _distill_overrides(synthesizer: str, kd_steps: int, checkpoint_every: int) -> list[str]:
    ov = ["teacher.train.epochs=3", "progress=false", "threads=1", "device=cpu", "seed=0",
          f"synthesizer={synthesizer}", "synthesizer.batch_size=16", "student=small_cnn",
          "distill.rounds=6", f"distill.kd_steps={kd_steps}", "distill.batch_size=16", "distill.pool_size=64",
          "distill.eval_every=3", f"distill.checkpoint_every={checkpoint_every}", "distill.budget_minutes=null",
          "distill.mix=both"]
    if synthesizer == "deepinversion":
        ov.append("synthesizer.iterations=2")
    else:  # adversarial: a small generator, one generator step per round
        ov += ["synthesizer.g_steps=1", "synthesizer.ngf=8", "synthesizer.nz=16"]
    return ov


def _distill_killed_and_resumed(tmp_path, monkeypatch, overrides, kill_after_round):
    from dfkd.bench import compose
    from dfkd.engine import Engine
    from dfkd.pipeline import run_distill

    full = run_distill(compose("distill", overrides), tmp_path / "full")

    logged: list[int] = []
    armed = [True]
    log = Engine.log

    def log_then_maybe_die(self, record):
        log(self, record)  # the round's metrics line is on disk, its checkpoint (if any) is not yet
        logged.append(record["round"])
        if armed[0] and record["round"] == kill_after_round:
            armed[0] = False
            raise Killed

    monkeypatch.setattr(Engine, "log", log_then_maybe_die)
    with pytest.raises(Killed):
        run_distill(compose("distill", overrides), tmp_path / "resumed")
    logged.clear()
    torch.manual_seed(12345)  # the resumed process starts with other global random state
    resumed = run_distill(compose("distill", overrides), tmp_path / "resumed")
    return full, resumed, logged


@pytest.mark.parametrize("synthesizer", ["deepinversion", "adversarial"])
def test_distill_killed_after_a_checkpoint_resumes_to_the_same_run(tmp_path, monkeypatch, cache_dir, synthesizer):
    # checkpoints at rounds 2, 4, 6; killed after logging round 5 (its work is lost, the round-4
    # checkpoint is what the second start finds)
    overrides = _distill_overrides(synthesizer, kd_steps=2, checkpoint_every=2)
    full, resumed, logged = _distill_killed_and_resumed(tmp_path, monkeypatch, overrides, kill_after_round=5)
    assert logged == [5, 6], f"the second start ran rounds {logged}, not only those after the checkpoint"
    assert resumed["rounds"] == full["rounds"] == 6
    assert resumed["ranks"][0]["student_digest"] == full["ranks"][0]["student_digest"]
    assert resumed["ranks"][0]["memory_digest"] == full["ranks"][0]["memory_digest"]
    assert _metrics(tmp_path / "resumed") == _metrics(tmp_path / "full")
    assert resumed["student_top1"] == full["student_top1"]


def test_distill_mix_both_resumes_after_an_odd_number_of_steps(tmp_path, monkeypatch, cache_dir):
    overrides = _distill_overrides("deepinversion", kd_steps=3, checkpoint_every=3)  # 9 steps at the checkpoint
    full, resumed, logged = _distill_killed_and_resumed(tmp_path, monkeypatch, overrides, kill_after_round=4)
    assert logged == [4, 5, 6]
    assert resumed["ranks"][0]["student_digest"] == full["ranks"][0]["student_digest"]
    assert _metrics(tmp_path / "resumed") == _metrics(tmp_path / "full")


def test_distill_with_a_weight_average_resumes_to_the_same_average(tmp_path, monkeypatch, cache_dir):
    overrides = [*_distill_overrides("deepinversion", kd_steps=2, checkpoint_every=2), "distill.ema=0.9"]
    full, resumed, logged = _distill_killed_and_resumed(tmp_path, monkeypatch, overrides, kill_after_round=5)
    assert logged == [5, 6]
    assert resumed["ranks"][0]["ema_digest"] == full["ranks"][0]["ema_digest"]
    assert resumed["ranks"][0]["student_digest"] == full["ranks"][0]["student_digest"]
    assert full["ranks"][0]["ema_digest"] != full["ranks"][0]["student_digest"]
    assert _metrics(tmp_path / "resumed") == _metrics(tmp_path / "full")
    assert resumed["student_top1"] == full["student_top1"]


# -- diffusion training --------------------------------------------------------------------------------
def _diffusion_data():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 4, (40,), generator=g)
    return images, labels


def _diffusion_result(out):
    """What a finished diffusion run leaves: the saved (EMA) UNet, the training state, the metadata."""
    from safetensors.torch import load_file

    from dfkd.diffusion import read_meta

    ema = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    state = torch.load(out / "train_state.pt", weights_only=True)
    meta = read_meta(out)
    return {
        "ema": tensor_digest([ema[k] for k in sorted(ema)]),
        "unet": tensor_digest([state["model"][k] for k in sorted(state["model"])]),
        "adam": tensor_digest([v for s in state["optimizer"]["state"].values() for _, v in sorted(s.items())]),
        "step": state["step"], "losses": state["task"]["losses"], "final_loss": meta["final_loss"],
        "loss_curve": meta["loss_curve"], "steps_done": meta["steps_done"],
    }


@pytest.mark.parametrize("how", ["killed", "interrupted"])
def test_diffusion_training_resumed_from_a_later_step_matches_the_uninterrupted_run(tmp_path, monkeypatch, how):
    """``killed``: the process dies during step 4, after the step-2 checkpoint, so steps 3 and 4 are
    done again; ``interrupted``: Ctrl-C during step 4 saves the state after step 3 on the way out."""
    pytest.importorskip("diffusers")
    import torch.nn.functional as F

    from dfkd.diffusion import train_diffusion

    images, labels = _diffusion_data()
    kw = dict(steps=6, batch_size=8, widths=(8, 16), progress=False, checkpoint_every=2, warmup=2)
    full = train_diffusion(images, labels, 4, tmp_path / "full", **kw)
    want = _diffusion_result(tmp_path / "full")

    calls = {"n": 0}
    mse = F.mse_loss

    def mse_then_maybe_die(*a, **k):  # one call per training step
        calls["n"] += 1
        if calls["n"] == 4:
            raise Killed if how == "killed" else KeyboardInterrupt
        return mse(*a, **k)

    out = tmp_path / "resumed"
    monkeypatch.setattr(F, "mse_loss", mse_then_maybe_die)
    with pytest.raises(Killed if how == "killed" else KeyboardInterrupt):
        train_diffusion(images, labels, 4, out, **kw)
    on_disk = torch.load(out / "train_state.pt", weights_only=True)["step"]
    assert on_disk == (2 if how == "killed" else 3)
    calls["n"] = -100  # never again
    torch.manual_seed(12345)
    done = train_diffusion(images, labels, 4, out, **kw)
    assert calls["n"] == -100 + 6 - on_disk, "the second start did not resume from the saved step"
    assert done["steps_done"] == full["steps_done"] == 6 and done["finished"]
    assert done["final_loss"] == full["final_loss"]
    assert _diffusion_result(out) == want
