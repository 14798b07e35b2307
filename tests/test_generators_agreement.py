"""Generators that make what they are asked for: requested-class agreement, diversity, bounded
adversarial terms, the mode-collapse warning, and DeepInversion's optimisation-space choices.

A digits teacher (small BatchNorm CNN, trained for three epochs, ~99 % test top-1) is trained once
per module; every synthesizer run is a few dozen steps at 8×8 on one thread.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from generators.base import build_synthesizer

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_GEN = dict(batch_size=16, nz=16, ngf=8)


@pytest.fixture(scope="module")
def digits_teacher(one_thread):
    from dfkd.data import load_digits
    from dfkd.models import build_model
    from dfkd.teacher import Teacher
    from dfkd.train import train_classifier

    data = load_digits()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model("small_cnn", num_classes=10, in_chans=1, width=8)
        result = train_classifier(model, data.train, data.test, epochs=3, batch_size=32, lr=0.1,
                                  weight_decay=0.0, progress=False)
    assert result["top1"] > 0.9, result
    return Teacher(model, [0.3], [0.4], (1, 8, 8), 10)


def _student():
    from dfkd.models import build_model
    from dfkd.teacher import Normalized

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return Normalized(build_model("small_cnn", num_classes=10, in_chans=1, width=4), [0.3], [0.4], (1, 8, 8), 10)


def _run(syn, rounds: int, student=None, kd_steps: int = 1) -> list[dict]:
    """Alternate synthesizer rounds with a few KD steps of ``student`` (the adversarial loop)."""
    from dfkd.losses import kd_loss

    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9) if student is not None else None
    stats = []
    for _ in range(rounds):
        batch = syn.step(student)
        stats.append(batch.stats)
        if student is not None:
            student.train()
            for _ in range(kd_steps):
                loss = kd_loss(student(batch.images), batch.teacher_logits)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return stats


# per generator: settings that learn at this tiny size (measured: fast_meta with bn 10 : ce 1 and
# 2 adaptation steps stays at chance here, 0.06-0.25 over 30 rounds)
TINY_SETTINGS = {"adversarial": dict(g_steps=2, lr=5e-3), "fast_meta": dict(g_steps=4, bn=1.0)}


@pytest.mark.parametrize("name", ["adversarial", "fast_meta"])
def test_generator_agreement_rises_well_above_chance(name, digits_teacher):
    syn = build_synthesizer(name, digits_teacher, seed=0, adv_loss="js", adv_mask=True, adv_gate=0.5,
                            **TINY_GEN, **TINY_SETTINGS[name])
    stats = _run(syn, 30, _student())
    first = sum(s["syn/teacher_acc"] for s in stats[:3]) / 3
    last = sum(s["syn/teacher_acc"] for s in stats[-5:]) / 5
    assert last >= 0.4, (first, last)  # chance is 0.1
    assert last > first
    # diversity: the batches spread over the classes, not one texture for all
    assert stats[-1]["syn/class_entropy"] > 0.8 and stats[-1]["syn/top_class_share"] < 0.5
    assert any(s["syn/adv_on"] == 1.0 for s in stats)  # the gate opened once the images were class-true


@pytest.mark.parametrize("name", ["deepinversion", "adversarial", "fast_meta"])
def test_every_classification_synthesizer_reports_agreement_and_diversity(name, bn_teacher):
    kw = dict(iterations=2) if name == "deepinversion" else dict(batch_size=8, nz=8, ngf=8, g_steps=1)
    batch = build_synthesizer(name, bn_teacher, seed=0, **({"batch_size": 8} | kw)).step(None)
    s = batch.stats
    pred = batch.teacher_logits.argmax(1)
    assert s["syn/teacher_acc"] == pytest.approx(float((pred == batch.labels).float().mean()))
    # the entropy of the batch-mean teacher distribution over log(K), computed here another way
    mean_p = batch.teacher_logits.float().softmax(1).mean(0)
    want = float(torch.distributions.Categorical(probs=mean_p).entropy()) / math.log(bn_teacher.num_classes)
    assert s["syn/class_entropy"] == pytest.approx(want, abs=1e-5)
    assert s["syn/top_class_share"] == pytest.approx(float(torch.bincount(pred).max()) / len(pred))


def test_class_stats_values(bn_teacher):
    syn = build_synthesizer("noise", bn_teacher, batch_size=4)
    even = torch.eye(4) * 20  # four confident images, one per class
    s = syn.class_stats(even, torch.tensor([0, 1, 2, 3]))
    assert s == pytest.approx({"syn/teacher_acc": 1.0, "syn/class_entropy": 1.0, "syn/top_class_share": 0.25},
                              abs=1e-4)
    one = torch.zeros(4, 4)
    one[:, 2] = 20  # every image is class 2
    s = syn.class_stats(one, torch.tensor([0, 1, 2, 3]))
    assert s["syn/teacher_acc"] == 0.25 and s["syn/top_class_share"] == 1.0 and s["syn/class_entropy"] < 0.01


def test_mode_collapse_warns_once(bn_teacher, caplog):
    syn = build_synthesizer("noise", bn_teacher, batch_size=4)
    wrong = torch.zeros(4, 4)
    wrong[:, 0] = 20
    labels = torch.tensor([1, 2, 3, 1])  # the teacher never agrees
    good = torch.eye(4)[[1, 2, 3, 1]] * 20
    with caplog.at_level(logging.WARNING, logger="dfkd"):
        for _ in range(syn.collapse_patience - 1):
            syn.class_stats(wrong, labels)
        syn.class_stats(good, labels)  # one good round resets the count
        for _ in range(syn.collapse_patience - 1):
            syn.class_stats(wrong, labels)
        assert not caplog.records
        for _ in range(3 * syn.collapse_patience):
            syn.class_stats(wrong, labels)
    warnings = [r for r in caplog.records if "mode collapse" in r.getMessage()]
    assert len(warnings) == 1 and "NoiseSynthesizer" in warnings[0].getMessage()


def test_bounded_discrepancy(bn_teacher):
    syn = build_synthesizer("adversarial", bn_teacher, batch_size=4, nz=8, ngf=8, adv_loss="js")
    t = torch.tensor([[100.0, 0, 0, 0], [0, 100.0, 0, 0]])
    s = torch.tensor([[0, 0, 0, 100.0], [0, 100.0, 0, 0]])  # row 0 disagrees hugely, row 1 agrees
    assert float(syn._discrepancy(s, t)) <= math.log(2) + 1e-6
    assert float(syn._discrepancy(s, t)) == pytest.approx(0.5 * math.log(2), abs=1e-3)
    syn.adv_mask = True  # only the agreeing row counts, and there student = teacher
    assert float(syn._discrepancy(s, t)) == pytest.approx(0.0, abs=1e-6)
    syn.adv_loss, syn.adv_mask = "kl", False
    assert float(syn._discrepancy(s, t)) > 40  # KL is unbounded
    syn.adv_clip = 2.0
    assert float(syn._discrepancy(s, t)) == pytest.approx(1.0, abs=1e-4)  # (2 + 0) / 2


def test_warmup_and_gate_keep_the_adversarial_term_off(bn_teacher, tiny_vit_student):
    syn = build_synthesizer("adversarial", bn_teacher, batch_size=8, nz=8, ngf=8, g_steps=1, adv_warmup=2)
    flags = [syn.step(tiny_vit_student).stats["syn/adv_on"] for _ in range(3)]
    assert flags == [0.0, 0.0, 1.0]
    gated = build_synthesizer("adversarial", bn_teacher, batch_size=8, nz=8, ngf=8, g_steps=1, adv_gate=1.01)
    assert all(gated.step(tiny_vit_student).stats["syn/adv_on"] == 0.0 for _ in range(2))
    assert gated.agreement_ema is not None
    state = gated.state_dict()
    other = build_synthesizer("adversarial", bn_teacher, batch_size=8, nz=8, ngf=8, g_steps=1, adv_gate=1.01, seed=4)
    other.load_state_dict(state)
    assert other.rounds == 2 and other.agreement_ema == gated.agreement_ema


def test_tv_norm_prior_matches_its_definition():
    from dfkd.losses.priors import tv_norm_prior

    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5) ** 1.5
    want = sum(float(torch.sqrt((d ** 2).sum())) for d in (
        x[..., :, :-1] - x[..., :, 1:], x[..., :-1, :] - x[..., 1:, :],
        x[..., 1:, :-1] - x[..., :-1, 1:], x[..., :-1, :-1] - x[..., 1:, 1:]))
    assert float(tv_norm_prior(x)) == pytest.approx(want, rel=1e-5)


def test_batchnorm_distance_is_the_unweighted_sum(bn_teacher):
    from dfkd.hooks import batchnorm_layers
    from dfkd.losses.priors import batchnorm_distance

    x = torch.rand(6, 3, 8, 8)
    feats = []
    handles = [m.register_forward_hook(lambda m, i, o: feats.append((m, i[0]))) for m in batchnorm_layers(bn_teacher.model)]
    try:
        bn_teacher(x)
    finally:
        for h in handles:
            h.remove()
    want = sum(float(torch.linalg.vector_norm(f.mean((0, 2, 3)) - m.running_mean)
                     + torch.linalg.vector_norm(f.var((0, 2, 3), unbiased=False) - m.running_var)) for m, f in feats)
    assert batchnorm_distance(bn_teacher, x) == pytest.approx(want, rel=1e-5)
    assert sum(len(m._forward_hooks) for m in bn_teacher.modules()) == 0


@pytest.mark.parametrize("space,clamp", [("pixel", True), ("normalized", False), ("normalized", True)])
def test_deepinversion_spaces_lower_the_batchnorm_distance(space, clamp, digits_teacher):
    from dfkd.losses.priors import batchnorm_distance

    kw = dict(batch_size=16, seed=0, space=space, clamp=clamp, bn=10.0, first_bn_multiplier=1.0, tv=1e-3,
              tv_kind="norm", l2=0.0, jitter=1, flip=False, init_std=1.0 if space == "normalized" else 0.2)
    start = build_synthesizer("deepinversion", digits_teacher, iterations=0, **kw).step(None)
    end = build_synthesizer("deepinversion", digits_teacher, iterations=40, **kw).step(None)
    assert end.images.min() >= 0 and end.images.max() <= 1 and torch.isfinite(end.images).all()
    assert batchnorm_distance(digits_teacher, end.images) < 0.7 * batchnorm_distance(digits_teacher, start.images)


def test_deepinversion_rejects_unknown_choices(bn_teacher):
    from dfkd.errors import DfkdError

    with pytest.raises(DfkdError, match="space"):
        build_synthesizer("deepinversion", bn_teacher, space="latent")
    with pytest.raises(DfkdError, match="tv_kind"):
        build_synthesizer("deepinversion", bn_teacher, tv_kind="l3")
    with pytest.raises(DfkdError, match="adv_loss"):
        build_synthesizer("adversarial", bn_teacher, adv_loss="wasserstein")
