"""student.init=teacher: a shallower student of the teacher's family starts from evenly spaced teacher blocks."""

import pytest
import timm
import torch

from conftest import run_cli
from dfkd.errors import DfkdError
from dfkd.models import build_model
from dfkd.models.from_teacher import block_map, describe, init_from_teacher
from dfkd.teacher import Normalized


def test_a_resnet20_takes_blocks_0_4_8_of_each_resnet56_stage():
    torch.manual_seed(0)
    teacher, student = build_model("resnet56_cifar", num_classes=10), build_model("resnet20_cifar", num_classes=10)
    wrapped = Normalized(student, [0.5] * 3, [0.25] * 3, (3, 32, 32), 10)  # dfkd's wrapper is looked through
    report = init_from_teacher(wrapped, teacher)
    assert report["blocks"] == {f"layer{i}": [0, 4, 8] for i in (1, 2, 3)}
    assert report["copied_parameters"] == report["student_parameters"] == sum(p.numel() for p in student.parameters())
    s, t = student.state_dict(), teacher.state_dict()
    assert torch.equal(s["layer2.1.conv1.weight"], t["layer2.4.conv1.weight"])
    assert torch.equal(s["layer3.2.bn2.running_var"], t["layer3.8.bn2.running_var"])  # buffers too
    assert torch.equal(s["conv1.weight"], t["conv1.weight"]) and torch.equal(s["linear.bias"], t["linear.bias"])
    assert not torch.equal(s["layer2.1.conv1.weight"], t["layer2.1.conv1.weight"])
    assert "teacher blocks 0,4,8" in describe(report)
    x = torch.rand(2, 3, 32, 32)
    assert torch.isfinite(student(x)).all()


def test_a_shallower_vit_takes_the_first_and_last_teacher_blocks():
    torch.manual_seed(0)
    kw = dict(img_size=16, patch_size=4, embed_dim=32, num_heads=2, num_classes=5)
    teacher = timm.create_model("vit_tiny_patch16_224", depth=6, **kw)
    student = timm.create_model("vit_tiny_patch16_224", depth=2, **kw)
    assert block_map(student, teacher) == {"blocks": [0, 5]}
    init_from_teacher(student, teacher)
    assert torch.equal(student.blocks[1].attn.qkv.weight, teacher.blocks[5].attn.qkv.weight)
    assert torch.equal(student.head.weight, teacher.head.weight)


def test_networks_of_different_families_are_a_one_line_error():
    teacher, student = build_model("resnet56_cifar", num_classes=10), build_model("small_cnn", num_classes=10)
    with pytest.raises(DfkdError, match="student.init=teacher: only .* counterpart") as e:
        init_from_teacher(student, teacher)
    assert "\n" not in str(e.value)


def test_a_bad_init_value_is_a_one_line_error(cache_dir):
    r = run_cli("dfkd-distill", "student.init=imagenet", "distill.rounds=1", "progress=false",
                env={"DFKD_CACHE": str(cache_dir)})
    assert r.returncode != 0
    assert "student.init must be 'scratch' or 'teacher', got 'imagenet'" in r.stderr
    assert "Traceback" not in r.stderr
