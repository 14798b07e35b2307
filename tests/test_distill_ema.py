"""distill.ema: a moving average of the student's weights, evaluated and saved instead of the raw student.

The average never changes the raw training trajectory; it is the decay-ramped average of the weights after
each optimizer step; it is in the checkpoint, so a resumed run ends with the same average; a decay outside
[0, 1) is a one-line error."""

import pytest
import torch

from dfkd.data import ArrayDataset
from dfkd.distill import Distiller, DistillSettings
from dfkd.errors import DfkdError
from dfkd.eval.classification import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


def _distiller(teacher, student, ema, run_dir=None, rounds=3, checkpoint_every=0):
    from generators import build_synthesizer

    torch.manual_seed(0)
    synth = build_synthesizer("noise", teacher, batch_size=8)
    g = torch.Generator().manual_seed(3)
    test = ArrayDataset(torch.rand(24, 3, 8, 8, generator=g), torch.randint(0, 4, (24,), generator=g))
    s = DistillSettings(rounds=rounds, kd_steps=2, batch_size=8, eval_every=0, checkpoint_every=checkpoint_every,
                        pool_size=32, ema=ema)
    return Distiller(teacher, student, synth, s, test, run_dir=run_dir, progress=False)


def _params(m):
    return [p.detach().clone() for p in m.parameters()]


def test_ema_off_is_the_plain_student(bn_teacher, tiny_vit_student, tmp_path):
    d = _distiller(bn_teacher, tiny_vit_student, 0.0, run_dir=tmp_path)
    assert d.ema is None and d.eval_model is tiny_vit_student
    d.fit()
    st = torch.load(d.checkpoint_path, weights_only=True)
    assert "ema" not in st["task"]


def test_ema_leaves_the_raw_trajectory_alone_and_is_the_ramped_average(bn_teacher, tiny_vit_student, monkeypatch):
    import copy

    plain_student = copy.deepcopy(tiny_vit_student)
    plain = _distiller(bn_teacher, plain_student, 0.0)
    plain.fit()

    start = _params(tiny_vit_student)
    seen = []
    update = Distiller._ema_update

    def record(self):
        seen.append(_params(self.student))
        update(self)

    monkeypatch.setattr(Distiller, "_ema_update", record)
    d = _distiller(bn_teacher, tiny_vit_student, 0.5)
    out = d.fit()
    assert len(seen) == 3 * 2
    # the same raw student as without the average (the average only reads the weights)
    for a, b in zip(plain_student.parameters(), tiny_vit_student.parameters()):
        assert torch.equal(a, b)
    # the average after each step n: decay min(0.5, (1 + n) / (10 + n))
    want = start
    for n, w in enumerate(seen):
        dec = min(0.5, (1 + n) / (10 + n))
        want = [dec * a + (1 - dec) * b for a, b in zip(want, w)]
    for e, w, p in zip(d.ema.parameters(), want, tiny_vit_student.parameters()):
        torch.testing.assert_close(e, w)
    assert any(not torch.equal(e, p) for e, p in zip(d.ema.parameters(), tiny_vit_student.parameters()))
    # evaluated with the average, not the raw weights
    ours = evaluate(d.ema, d.test_set)
    assert out["student_top1"] == ours["top1"]
    assert d.evaluate()["loss"] == ours["loss"] != evaluate(tiny_vit_student, d.test_set)["loss"]


def test_checkpoint_holds_the_average_and_a_resume_restores_it(bn_teacher, tiny_vit_student, tmp_path):
    import copy

    fresh = copy.deepcopy(tiny_vit_student)
    d = _distiller(bn_teacher, tiny_vit_student, 0.9, run_dir=tmp_path, rounds=2, checkpoint_every=1)
    d.fit()
    st = torch.load(d.checkpoint_path, weights_only=True)
    assert set(st["task"]["ema"]) == set(d.ema.state_dict())
    # a new process: same settings, 2 more rounds would follow; loading alone must give back the average
    again = _distiller(bn_teacher, fresh, 0.9, run_dir=tmp_path, rounds=2, checkpoint_every=1)
    again.fit(resume=True)  # finished: nothing to run, the state is restored from the checkpoint
    for a, b in zip(again.ema.state_dict().values(), d.ema.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(again.student.parameters(), d.student.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_a_decay_outside_0_1_is_a_one_line_error(bn_teacher, tiny_vit_student, bad):
    with pytest.raises(DfkdError, match=r"distill\.ema") as e:
        DistillSettings(ema=bad).validate()
    assert "\n" not in str(e.value)
    with pytest.raises(DfkdError, match=r"distill\.ema"):
        _distiller(bn_teacher, tiny_vit_student, bad)
