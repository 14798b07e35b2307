"""The shared pretrained CIFAR-10 ResNets load as they are and score their published accuracy."""

import pytest
import torch

from conftest import shared_data

DATA = shared_data()
pytestmark = pytest.mark.skipif(
    DATA is None or not (DATA / "teachers" / "resnet_cifar10").is_dir(),
    reason="set DFKD_DATA to the folder holding cifar10/ and teachers/resnet_cifar10/ to run this test",
)


@pytest.mark.parametrize("depth,file,expected", [
    (20, "resnet20-12fca82f.th", 0.9173),
    (56, "resnet56-4bfd9763.th", 0.9339),
])
def test_pretrained_cifar_resnets_score_their_accuracy(depth, file, expected):
    from dfkd.data import load_cifar10
    from dfkd.eval.classification import evaluate
    from dfkd.models import build_model
    from dfkd.teacher import Teacher

    data = load_cifar10(DATA, train=False)
    model = build_model(f"resnet{depth}_cifar", checkpoint=DATA / "teachers" / "resnet_cifar10" / file)
    teacher = Teacher(model, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], (3, 32, 32), 10)
    with torch.inference_mode():
        top1 = evaluate(teacher, data.test, batch_size=1000)["top1"]
    assert top1 == pytest.approx(expected, abs=5e-5)
