"""The shared pretrained CIFAR-10 ResNets load as they are and score their published accuracy.

Scoring all 10,000 test images takes over a minute on two cores (ResNet-56 alone ~75 s), so the test
scores a fixed subset, every 10th image (1,000 images, 100 per class: the file is ordered by class),
against a reference computed the same way: the full test set was scored once with this code, gave
exactly the published figures (9,173 and 9,339 correct), and the subset's correct count was read from
those same per-image results. One image predicted differently changes the count. The subset's mean
cross-entropy is recorded too (to 2e-5 relative; batch size moves it by 1e-7): it also catches a
change too small to flip a prediction among 1,000 images, such as a 2 % error in the normalisation's
std, which moves it by 0.15 %.
"""

import math

import pytest
import torch

from conftest import shared_data

DATA = shared_data()
pytestmark = pytest.mark.skipif(
    DATA is None or not (DATA / "teachers" / "resnet_cifar10").is_dir(),
    reason="set DFKD_DATA to the folder holding cifar10/ and teachers/resnet_cifar10/ to run this test",
)

STRIDE = 10


@pytest.mark.parametrize("depth,file,published,subset_correct,subset_loss", [
    (20, "resnet20-12fca82f.th", 0.9173, 912, 0.3915093),
    (56, "resnet56-4bfd9763.th", 0.9339, 939, 0.3125932),
])
def test_pretrained_cifar_resnets_score_their_accuracy(depth, file, published, subset_correct, subset_loss):
    from dfkd.data import ArrayDataset, load_cifar10
    from dfkd.eval.classification import evaluate
    from dfkd.models import build_model
    from dfkd.teacher import Teacher

    test = load_cifar10(DATA, train=False).test
    assert len(test) == 10_000
    subset = ArrayDataset(test.images[::STRIDE], test.labels[::STRIDE])
    n = len(subset)
    assert n == 1000 and torch.equal(torch.bincount(subset.labels, minlength=10), torch.full((10,), 100))
    # the recorded subset figure is a fair sample of the published one (within 3 binomial standard errors)
    assert abs(subset_correct / n - published) <= 3 * math.sqrt(published * (1 - published) / n)
    model = build_model(f"resnet{depth}_cifar", checkpoint=DATA / "teachers" / "resnet_cifar10" / file)
    teacher = Teacher(model, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], (3, 32, 32), 10)
    with torch.inference_mode():
        r = evaluate(teacher, subset, batch_size=500)
    assert r["n"] == n and r["top1"] == subset_correct / n, (r["top1"], subset_correct)
    assert r["loss"] == pytest.approx(subset_loss, rel=2e-5)
