"""The one engine (dfkd.engine): schedule, budget, resume and extension, Ctrl-C, hooks and modes.

A toy task (a linear model on fixed random data) keeps these fast; the wall clock is replaced by a
counter that advances one second per round, so the budget tests are deterministic.
"""

import pytest
import torch
from torch import nn

import dfkd.engine as E
from dfkd.engine import Engine, Schedule, Task
from dfkd.optim import lr_factor


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(E, "_clock", c)
    return c


class Toy(Task):
    """Two optimizer steps per round on a fixed batch; each round takes one (fake) second."""

    def __init__(self, model, clock=None, steps=2, fail_at_round=None, fail_in_update=False):
        self.model, self.clock, self.steps = model, clock, steps
        self.g = torch.Generator().manual_seed(0)
        self.fail_at_round, self.fail_in_update = fail_at_round, fail_in_update
        self.lrs = []
        self.rounds_run = 0

    def modules(self):
        return [self.model]

    def round(self, engine):
        self.rounds_run += 1
        self.lrs.append(engine.lr)
        total = 0.0
        for i in range(self.steps):
            x = torch.randn(8, 4, generator=self.g)
            if self.fail_at_round == engine.round + 1 and i == 1 and not self.fail_in_update:
                raise KeyboardInterrupt
            loss = (self.model(x) - x.sum(1, keepdim=True)).pow(2).mean()

            def after():
                if self.fail_at_round == engine.round + 1 and self.fail_in_update:
                    raise KeyboardInterrupt

            total = total + engine.optimizer_step(loss, after=after)
        if self.clock is not None:
            self.clock.t += 1.0
        return {"loss": total / self.steps}

    def state_dict(self):
        return {"rng": self.g.get_state()}

    def load_state_dict(self, st):
        self.g.set_state(st["rng"])


def make(total=6, budget=None, saved=None, checkpoint_every=1, metrics_path=None, lr=0.1, warmup=0.0):
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    eng = Engine(model, opt, Schedule(lr, total, "round", warmup, "cosine", budget), checkpoint_every=checkpoint_every,
                 save_fn=(lambda st: saved.append(st)) if saved is not None else None, metrics_path=metrics_path)
    return model, eng


def digest(model):
    return [p.detach().clone() for p in model.parameters()]


def test_schedule_follows_rounds_and_records_sync_tensors(tmp_path):
    model, eng = make(total=4, metrics_path=tmp_path / "m.jsonl", warmup=0.25)
    task = Toy(model)
    out = eng.run(task)
    assert out["rounds"] == 4 and out["steps"] == 8 and not out["stopped_by_budget"]
    want = [0.1 * lr_factor(r / 4, 0.25) for r in range(4)]
    assert task.lrs == pytest.approx(want)
    assert task.lrs[0] < task.lrs[1]  # warm-up, then cosine down
    assert all(isinstance(r["loss"], float) for r in eng.history)  # device tensors synced once per round
    lines = (tmp_path / "m.jsonl").read_text().splitlines()
    assert len(lines) == 4


def test_killed_run_resumes_to_the_same_weights():
    full_model, full = make(total=6)
    full.run(Toy(full_model))
    want = digest(full_model)

    saved = []
    model, eng = make(total=6, saved=saved, checkpoint_every=2)
    task = Toy(model, fail_at_round=None)
    orig = task.round

    def dies_in_round_5(engine):
        if engine.round == 4:
            raise RuntimeError("killed")
        return orig(engine)

    task.round = dies_in_round_5
    with pytest.raises(RuntimeError):
        eng.run(task)
    st = saved[-1]
    assert st["round"] == 4 and st["step"] == 8
    model2, eng2 = make(total=6)
    task2 = Toy(model2)
    torch.manual_seed(123)
    eng2.run(task2, st)
    assert task2.rounds_run == 2, "the resumed run did not start from the checkpoint"
    assert all(torch.equal(a, b) for a, b in zip(digest(model2), want))
    assert [r["round"] for r in eng2.history] == [1, 2, 3, 4, 5, 6]


def test_ctrl_c_between_steps_saves_the_run_as_it_stands():
    saved = []
    model, eng = make(total=6, saved=saved, checkpoint_every=0)
    with pytest.raises(KeyboardInterrupt):
        eng.run(Toy(model, fail_at_round=3))
    st = saved[-1]
    assert st["round"] == 2 and st["step"] == 5  # two whole rounds and the first step of the third
    assert torch.equal(st["model"]["weight"], model.weight.detach())


def test_ctrl_c_inside_an_update_keeps_the_last_checkpoint():
    saved = []
    model, eng = make(total=6, saved=saved, checkpoint_every=1)
    with pytest.raises(KeyboardInterrupt):
        eng.run(Toy(model, fail_at_round=3, fail_in_update=True))
    assert [s["round"] for s in saved] == [1, 2], "a half-updated state was saved"


def test_budget_stops_and_a_resume_continues_the_same_curve(clock):
    saved = []
    model, eng = make(total=100, budget=4.0, saved=saved)
    t1 = Toy(model, clock)
    out = eng.run(t1)
    assert out["stopped_by_budget"] and out["rounds"] == 4
    assert t1.lrs == pytest.approx([0.1 * lr_factor(w / 4.0) for w in range(4)])  # wall fraction drives it
    # extending the budget: the run goes on from the 4 s spent, on the schedule of the longer budget
    model2, eng2 = make(total=100, budget=6.0)
    t2 = Toy(model2, clock)
    out2 = eng2.run(t2, saved[-1])
    assert t2.rounds_run == 2 and out2["rounds"] == 6
    assert t2.lrs == pytest.approx([0.1 * lr_factor(4 / 6), 0.1 * lr_factor(5 / 6)])


def test_extending_a_finished_run_recomputes_the_schedule_for_the_new_total():
    saved = []
    model, eng = make(total=4, saved=saved)
    eng.run(Toy(model))
    assert eng.lr == pytest.approx(0.1 * lr_factor(3 / 4))
    model2, eng2 = make(total=8)
    t2 = Toy(model2)
    out = eng2.run(t2, saved[-1])
    assert out["rounds"] == 8 and t2.rounds_run == 4
    # the rate jumps back up to where an 8-round run is at round 4, then anneals again
    assert t2.lrs[0] == pytest.approx(0.1 * lr_factor(4 / 8)) and t2.lrs[0] > eng.lr
    assert t2.lrs == sorted(t2.lrs, reverse=True)


def test_modes_and_hooks_restored_when_a_round_raises():
    model, eng = make(total=4)
    model.eval()
    calls = []

    class Hooked(Toy):
        def begin(self, engine):
            self.h = self.model.register_forward_hook(lambda *a: calls.append(1))

        def end(self, engine):
            self.h.remove()

        def round(self, engine):
            self.model.train()
            self.model(torch.zeros(1, 4))
            raise ValueError("boom")

    with pytest.raises(ValueError):
        eng.run(Hooked(model))
    assert calls == [1]
    assert not model._forward_hooks and not model.training


def test_deepinversion_step_raising_leaves_no_hook_and_modes(bn_teacher, tiny_vit_student, monkeypatch):
    """Through the classification task: an error inside a synthesizer step mid-run."""
    from dfkd.distill import Distiller, DistillSettings
    from generators import build_synthesizer

    synth = build_synthesizer("deepinversion", bn_teacher, batch_size=4, iterations=2)
    d = Distiller(bn_teacher, tiny_vit_student, synth, DistillSettings(rounds=3, kd_steps=1, batch_size=4,
                                                                       eval_every=0, checkpoint_every=0),
                  progress=False)
    orig = type(bn_teacher).forward
    n = {"calls": 0}

    def forward_fails_later(self, x):
        n["calls"] += 1
        if n["calls"] == 6:
            raise RuntimeError("boom")
        return orig(self, x)

    tiny_vit_student.eval()
    bn_teacher.eval()
    modes = [m.training for m in list(bn_teacher.modules()) + list(tiny_vit_student.modules())]
    monkeypatch.setattr(type(bn_teacher), "forward", forward_fails_later)
    with pytest.raises(RuntimeError, match="boom"):
        d.fit()
    assert n["calls"] == 6
    after = [m.training for m in list(bn_teacher.modules()) + list(tiny_vit_student.modules())]
    assert after == modes
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in bn_teacher.modules())


class RankClock:
    """Rank r's fake wall clock: advances 1 + 2r seconds per round, so the ranks disagree about the budget."""

    def __init__(self, per_round):
        self.t, self.per_round = 0.0, per_round

    def __call__(self):
        return self.t


def _budget_race_worker(rank, world, store, synced, out):
    import json

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        clock = RankClock(1.0 + 2.0 * rank)
        E._clock = clock  # this process only
        torch.manual_seed(0)
        model = nn.Linear(4, 1)
        eng = Engine(model, torch.optim.SGD(model.parameters(), lr=0.1),
                     Schedule(0.1, 100, "round", 0.0, "cosine", 12.0), distributed=synced)

        class Task(Toy):
            def round(self, engine):
                r = super().round(engine)
                clock.t += clock.per_round
                return r

        task = Task(model)
        res = eng.run(task)
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"rounds": res["rounds"], "lrs": task.lrs, "budget": res["stopped_by_budget"]}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("synced", [True, False])
def test_ranks_whose_clocks_disagree_stop_at_the_same_round_with_the_same_rates(tmp_path, synced):
    """Two Gloo ranks with fake clocks running at different speeds (rank 1 reaches the 12 s budget in 4
    rounds, rank 0 in 12): the engine's all-reduced budget flag and wall time make both stop at rank 1's
    round with the same learning rates. The unsynced run (distributed=False) is the control: the race
    is real there, the ranks stop at different rounds."""
    import json
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    out = tmp_path / "res"
    procs = [ctx.Process(target=_budget_race_worker, args=(r, 2, tmp_path / "store", synced, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    r0, r1 = (json.loads(out.with_name(f"res.{r}").read_text()) for r in range(2))
    assert r0["budget"] and r1["budget"]
    if synced:
        assert r0["rounds"] == r1["rounds"] == 4
        assert r0["lrs"] == r1["lrs"]
    else:
        assert (r0["rounds"], r1["rounds"]) == (12, 4)
