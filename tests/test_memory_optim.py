"""The memory pool on the host (uint8), its capped checkpoints, and the one optimizer builder."""

import pytest
import torch

from dfkd.distill import Memory
from dfkd.optim import build_optimizer, lr_factor, param_groups
from generators.base import SyntheticBatch


def _batch(n, seed, size=(3, 16, 16)):
    g = torch.Generator().manual_seed(seed)
    return SyntheticBatch(images=torch.rand(n, *size, generator=g), labels=torch.arange(n) % 4, targets=None,
                          teacher_logits=torch.randn(n, 4, generator=g), stats={})


def test_host_memory_stores_uint8_and_samples_floats_close_to_the_images():
    m = Memory(64, torch.device("cpu"), storage="host")
    b = _batch(8, 0)
    m.add(b)
    assert m.on_host and m.images.dtype == torch.uint8 and m.size == 8
    g = torch.Generator().manual_seed(0)
    x, t = m.sample(8, g)
    assert x.dtype == torch.float32 and x.shape == (8, 3, 16, 16)
    idx = torch.randint(8, (8,), generator=torch.Generator().manual_seed(0))
    assert (x - b.images[idx]).abs().max() <= 0.5 / 255 + 1e-6
    assert torch.allclose(t, b.teacher_logits[idx].half().float())


def test_auto_storage_picks_the_host_for_large_pools_only():
    small = Memory(100, torch.device("cpu"), storage="auto", host_above_mb=1.0)
    small.add(_batch(2, 0, (1, 8, 8)))
    big = Memory(10_000, torch.device("cpu"), storage="auto", host_above_mb=1.0)
    big.add(_batch(2, 0, (3, 32, 32)))
    assert not small.on_host and small.images.dtype == torch.float16
    assert big.on_host and big.images.dtype == torch.uint8


def test_checkpoint_keeps_the_most_recent_images_up_to_its_cap_and_resume_is_exact_below_it():
    per_image_mb = 3 * 16 * 16 / 2**20  # uint8
    m = Memory(40, torch.device("cpu"), storage="host", checkpoint_mb=10 * per_image_mb)
    for k in range(5):
        m.add(_batch(8, k))  # 40 images, ring full
    m.add(_batch(8, 99))  # overwrites the oldest 8
    st = m.state_dict()
    assert st["size"] == 10 and st["dropped"] == 30
    newest = m._encode(_batch(8, 99).images)
    assert torch.equal(st["images"][-8:], newest)  # the newest batch is kept, oldest first
    r = Memory(40, torch.device("cpu"), storage="host")
    r.load_state_dict(st)
    assert r.size == 10 and r.head == 10 and torch.equal(r.images[:10], st["images"])
    # under the cap the whole ring round-trips exactly (resume equivalence)
    full = Memory(40, torch.device("cpu"), storage="device")
    for k in range(6):
        full.add(_batch(8, k))
    st2 = full.state_dict()
    back = Memory(40, torch.device("cpu"), storage="device")
    back.load_state_dict(st2)
    assert back.head == full.head and torch.equal(back.images, full.images) and torch.equal(back.logits, full.logits)


def test_no_weight_decay_on_biases_norms_position_embeddings_and_tokens():
    import timm

    from dfkd.teacher import Normalized

    vit = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2,
                            num_classes=3)
    net = Normalized(vit, [0.5] * 3, [0.5] * 3, (3, 16, 16), 3)
    decay, no_decay = param_groups(net, 0.05)
    names = {id(p): n for n, p in net.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert {"model.pos_embed", "model.cls_token", "model.norm.weight", "model.head.bias"} <= nd
    assert "model.patch_embed.proj.weight" in d and "model.blocks.0.attn.qkv.weight" in d
    assert not (nd & d) and len(nd) + len(d) == len(list(net.parameters()))
    opt = build_optimizer(net, "adamw", lr=1e-3, weight_decay=0.05)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


def test_schedule_warms_up_then_anneals_to_zero():
    assert lr_factor(0.0, 0.1) == pytest.approx(1e-3)
    assert lr_factor(0.05, 0.1) == pytest.approx(0.5)
    assert lr_factor(0.1, 0.1) == pytest.approx(1.0)
    assert lr_factor(0.55, 0.1) == pytest.approx(0.5)
    assert lr_factor(1.0, 0.1) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(0.7, 0.0, "constant") == 1.0


def test_fp16_training_uses_a_grad_scaler(bn_teacher, tiny_vit_student):
    from dfkd.distill import Distiller, DistillSettings
    from generators import build_synthesizer

    synth = build_synthesizer("noise", bn_teacher, batch_size=8)
    d = Distiller(bn_teacher, tiny_vit_student, synth, DistillSettings(rounds=2, kd_steps=2, batch_size=8, amp="fp16",
                                                                       eval_every=0, checkpoint_every=0), progress=False)
    assert d.scaler is not None
    before = [p.detach().clone() for p in tiny_vit_student.parameters()]
    d.fit()
    assert any(not torch.equal(a, b) for a, b in zip(before, tiny_vit_student.parameters()))
    assert all(torch.isfinite(p).all() for p in tiny_vit_student.parameters())
