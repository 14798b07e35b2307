"""The penultimate-feature KD loss: student features regressed onto the teacher's classifier input."""

import copy

import pytest
import torch

from dfkd.errors import DfkdError
from dfkd.losses.student import build_student_loss, classifier_head
from dfkd.models import build_model
from dfkd.teacher import Teacher


def _hooks(m):
    return sum(len(x._forward_pre_hooks) + len(x._forward_hooks) for x in m.modules())


def test_a_copy_of_the_teacher_has_zero_loss_and_a_narrower_student_learns_the_features(bn_teacher):
    loss = build_student_loss("penultimate", kd=1.0, feature=1.0)
    twin = copy.deepcopy(bn_teacher).eval()
    x = torch.rand(16, 3, 8, 8)
    value, stats = loss(twin, bn_teacher, x)
    assert float(value) < 1e-6 and stats["loss/feature"] < 1e-6
    assert isinstance(loss.proj, torch.nn.Identity)  # same width: no projection

    torch.manual_seed(0)
    student = Teacher(build_model("small_cnn", num_classes=4, in_chans=3, width=4), [0.5] * 3, [0.25] * 3, (3, 8, 8), 4)
    loss = build_student_loss("penultimate", kd=0.0, feature=1.0)
    loss.setup(student, bn_teacher)
    assert isinstance(loss.proj, torch.nn.Linear)  # the widths differ: a learned projection
    opt = torch.optim.Adam(list(student.parameters()) + list(loss.parameters()), lr=1e-2)
    first = None
    for _ in range(40):
        value, stats = loss(student, bn_teacher, x)
        first = stats["loss/feature"] if first is None else first
        opt.zero_grad()
        value.backward()
        opt.step()
    assert stats["loss/feature"] < 0.5 * first
    assert all(p.grad is None for p in bn_teacher.parameters())
    assert _hooks(student) == _hooks(bn_teacher) == 0


def test_the_feature_term_adds_to_logit_kd(bn_teacher):
    torch.manual_seed(1)
    student = Teacher(build_model("small_cnn", num_classes=4, in_chans=3, width=8), [0.5] * 3, [0.25] * 3, (3, 8, 8), 4)
    x = torch.rand(8, 3, 8, 8)
    kd_only, _ = build_student_loss("kd")(student, bn_teacher, x)
    both, stats = build_student_loss("penultimate", kd=1.0, feature=2.0)(student, bn_teacher, x)
    assert torch.allclose(both, kd_only + 2.0 * stats["loss/feature"], rtol=1e-4)
    assert stats["loss/feature"] > 0


def test_a_model_without_a_linear_head_is_a_clear_error():
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with pytest.raises(DfkdError, match="classifier nn.Linear"):
        classifier_head(conv)
    with pytest.raises(DfkdError, match="weights"):
        build_student_loss("penultimate", feature=-1.0)


def test_head_from_teacher_copies_the_classifier_once_and_only_where_the_shapes_match(bn_teacher):
    torch.manual_seed(2)
    student = Teacher(build_model("small_cnn", num_classes=4, in_chans=3, width=8), [0.5] * 3, [0.25] * 3, (3, 8, 8), 4)
    hs, ht = classifier_head(student), classifier_head(bn_teacher)
    assert not torch.equal(hs.weight, ht.weight)
    loss = build_student_loss("penultimate", head_from_teacher=True)
    loss.setup(student, bn_teacher)
    assert torch.equal(hs.weight, ht.weight) and torch.equal(hs.bias, ht.bias)
    assert hs.weight.data_ptr() != ht.weight.data_ptr()  # a copy: training the student leaves the teacher alone
    narrow = Teacher(build_model("small_cnn", num_classes=4, in_chans=3, width=4), [0.5] * 3, [0.25] * 3, (3, 8, 8), 4)
    with pytest.raises(DfkdError, match="head_from_teacher needs classifiers of the same shape"):
        build_student_loss("penultimate", head_from_teacher=True).setup(narrow, bn_teacher)
    other = Teacher(build_model("small_cnn", num_classes=4, in_chans=3, width=8), [0.5] * 3, [0.25] * 3, (3, 8, 8), 4)
    build_student_loss("penultimate").setup(other, bn_teacher)  # the default leaves the student's head alone
    assert not torch.equal(classifier_head(other).weight, ht.weight)
