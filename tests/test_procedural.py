"""Procedural dead-leaves images: the generator-free data-free source and DeepInversion's alternative start."""

import pytest
import torch

from dfkd.errors import DfkdError
from dfkd.teacher import Teacher
from generators import build_synthesizer
from generators.procedural import dead_leaves, mixed, spectral, textured_leaves


def test_dead_leaves_are_seeded_images_of_occluding_flat_shapes():
    a = dead_leaves(16, 3, (24, 32), torch.Generator().manual_seed(0), noise=0.0)
    b = dead_leaves(16, 3, (24, 32), torch.Generator().manual_seed(0), noise=0.0)
    c = dead_leaves(16, 3, (24, 32), torch.Generator().manual_seed(1), noise=0.0)
    assert a.shape == (16, 3, 24, 32) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    # flat shapes with gentle shading: most neighbouring pixels are nearly equal, a few differ a lot (edges)
    d = (a[..., 1:] - a[..., :-1]).abs()
    assert (d < 0.05).float().mean() > 0.6
    assert (d > 0.2).float().mean() > 0.02
    # not one colour: images and channels differ
    assert a.mean((2, 3)).std() > 0.1


def test_dead_leaves_shape_sizes_follow_the_radius_range():
    """Large shapes make few edges, many small ones many: the radius range is what sets the scale."""
    g = torch.Generator().manual_seed(0)
    big = dead_leaves(8, 1, (32, 32), g, shapes=48, r_min=0.3, r_max=0.6, noise=0.0)
    small = dead_leaves(8, 1, (32, 32), g, shapes=400, r_min=0.03, r_max=0.06, noise=0.0)
    edges = [float(((x[..., 1:] - x[..., :-1]).abs() > 0.05).float().mean()) for x in (big, small)]
    assert edges[1] > 3 * edges[0]


def test_textured_leaves_add_stripes_and_mottling_inside_the_shapes():
    """Flat shapes change colour only at edges; striped and mottled ones change inside too, so textured
    images have more small-but-nonzero neighbour differences than plain dead leaves from the same seed."""
    plain = dead_leaves(32, 3, (32, 32), torch.Generator().manual_seed(0), noise=0.0)
    tex = textured_leaves(32, 3, (32, 32), torch.Generator().manual_seed(0), noise=0.0)
    assert tex.shape == plain.shape and 0 <= tex.min() and tex.max() <= 1

    def ripple(x):  # neighbour differences too small for an edge, too large for the gentle shading
        d = (x[..., 1:] - x[..., :-1]).abs()
        return float(((d > 0.02) & (d < 0.2)).float().mean())
    assert ripple(tex) > 2 * ripple(plain)


def test_spectral_images_follow_a_falling_spectrum_and_mixed_draws_every_family():
    g = torch.Generator().manual_seed(0)
    x = spectral(64, 3, (32, 32), g)
    assert x.shape == (64, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    power = torch.fft.rfft2(x - x.mean((2, 3), keepdim=True)).abs().pow(2).mean((0, 1))
    assert power[1:4, 1:4].mean() > 20 * power[12:16, 12:16].mean()  # low frequencies dominate
    m = mixed(60, 3, (32, 32), torch.Generator().manual_seed(1), noise=0.0)
    d2 = m[..., 2:] - 2 * m[..., 1:-1] + m[..., :-2]
    smooth = (d2.abs() < 1e-5).float().mean((1, 2, 3))
    # dead-leaves shapes (noise 0) are linear ramps, second differences 0; spectral noise has none such
    assert (smooth > 0.3).any() and (smooth < 0.01).any()


def test_procedural_saturation_pulls_colours_to_grey(bn_teacher):
    full = build_synthesizer("procedural", bn_teacher, batch_size=8, seed=0, saturation=1.0).step().images
    grey = build_synthesizer("procedural", bn_teacher, batch_size=8, seed=0, saturation=0.0).step().images
    half = build_synthesizer("procedural", bn_teacher, batch_size=8, seed=0, saturation=0.5).step().images
    spread = [float((x - x.mean(1, keepdim=True)).abs().mean()) for x in (full, half, grey)]
    assert spread[2] < 1e-6 and abs(spread[1] - spread[0] / 2) < 1e-4
    default = build_synthesizer("procedural", bn_teacher, batch_size=8, seed=0).step().images
    assert torch.allclose(default, full)  # the shipped default keeps the drawn colours


def _colour_teacher():
    """A teacher whose class is which channel is brightest, with a rarely predicted 4th class for bright images."""
    class Net(torch.nn.Module):
        def forward(self, x):
            m = x.mean((2, 3))
            return 20 * torch.cat([m - m.mean(1, keepdim=True), m.mean(1, keepdim=True) - 0.55], 1)
    return Teacher(Net(), [0.0] * 3, [1.0] * 3, (3, 8, 8), 4)


def test_oversampling_balances_the_classes_the_teacher_sees():
    t = _colour_teacher()

    def counts(oversample):
        syn = build_synthesizer("procedural", t, batch_size=64, seed=0, oversample=oversample)
        return torch.bincount(syn.step().teacher_logits.argmax(1), minlength=4)

    plain, balanced = counts(1), counts(8)
    assert balanced.tolist() == [16] * 4  # the 4 classes take turns picking their most confident candidate
    assert plain.max() - plain.min() > balanced.max() - balanced.min()


def test_procedural_rejects_bad_settings(bn_teacher):
    for kw in (dict(pattern="fractal"), dict(oversample=0), dict(r_min=0.5, r_max=0.1), dict(saturation=1.5)):
        with pytest.raises(DfkdError):
            build_synthesizer("procedural", bn_teacher, **kw)


@pytest.mark.parametrize("space", ["pixel", "normalized"])
def test_deepinversion_starts_from_dead_leaves(space, bn_teacher):
    """With lr 0 the optimisation does not move the start: the images are the dead-leaves images."""
    syn = build_synthesizer("deepinversion", bn_teacher, batch_size=4, seed=5, iterations=1, lr=0.0, jitter=0,
                            flip=False, init="dead_leaves", space=space, clamp=False)
    expected = dead_leaves(4, 3, (8, 8), torch.Generator().manual_seed(5))
    assert torch.allclose(syn.step().images, expected, atol=1e-5)


def test_deepinversion_init_is_checked(bn_teacher):
    with pytest.raises(DfkdError, match="init"):
        build_synthesizer("deepinversion", bn_teacher, init="fractal")
    with pytest.raises(DfkdError, match="dead_leaves"):
        build_synthesizer("deepinversion", bn_teacher, init="dead_leaves", downsample=2)
