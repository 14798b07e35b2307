"""Teacher-guided diffusion sampling and teacher-distilled diffusion models, with tiny random
diffusers components saved to and loaded from a temporary folder (no network)."""

import json
import socket

import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")

from dfkd.errors import DfkdError  # noqa: E402
from dfkd.teacher import Teacher  # noqa: E402
from generators import SYNTHESIZERS  # noqa: E402
from generators.diffusion import load_diffusion  # noqa: E402


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def tiny_teacher(channels=1, size=8, num_classes=4, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, num_classes),
    )
    with torch.no_grad():  # non-trivial running statistics
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 1.5)
        net[-1].weight.mul_(4)  # confident enough that guidance has something to follow
    return Teacher(net, [0.5] * channels, [0.5] * channels, (channels, size, size), num_classes)


def save_tiny_model(root, channels=1, size=8, num_classes=4, latent=False, class_conditional=True):
    torch.manual_seed(1)
    in_ch = 4 if latent else channels
    unet = diffusers.UNet2DModel(
        sample_size=size // 2 if latent else size, in_channels=in_ch, out_channels=in_ch,
        block_out_channels=(4, 8), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1, norm_num_groups=4,
        num_class_embeds=(num_classes + 1) if class_conditional else None,
    )
    unet.save_pretrained(str(root / "unet"))
    diffusers.DDPMScheduler(num_train_timesteps=100).save_pretrained(str(root / "scheduler"))
    if latent:
        vae = diffusers.AutoencoderKL(
            in_channels=channels, out_channels=channels, latent_channels=4, block_out_channels=(4, 8),
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            norm_num_groups=4, sample_size=size,
        )
        vae.save_pretrained(str(root / "vae"))
    if class_conditional:
        (root / "dfkd_diffusion.json").write_text(json.dumps({"null_class": num_classes}))
    return root


def guided_and_plain(syn, teacher, n=32):
    """The teacher's cross-entropy to the target classes and its accuracy on ``n`` images sampled
    with and without guidance from the same starting noise, measured here with the teacher itself
    (not with the synthesizer's own helpers)."""
    labels = torch.arange(n) % teacher.num_classes
    state = syn.rng.get_state()
    plain, _ = syn.sample(labels, guidance=0.0)
    syn.rng.set_state(state)
    guided, _ = syn.sample(labels)
    assert (guided - plain).abs().mean() > 0.05  # same noise, different images: guidance acted
    out = {}
    with torch.no_grad():
        for k, img in (("plain", plain), ("guided", guided)):
            logits = teacher(img).float()
            out[f"ce_{k}"] = float(-logits.log_softmax(1)[torch.arange(n), labels].mean())
            out[f"acc_{k}"] = float((logits.argmax(1) == labels).float().mean())
    return out


def make(teacher, path, **kw):
    kw = {"batch_size": 16, "steps": 6, "scheduler": "ddim", "guidance": 3.0, "seed": 0, **kw}
    return SYNTHESIZERS.build("diffusion", teacher=teacher, path=str(path), **kw)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm", "ddpm", "euler"])
def test_shapes_ranges_and_guidance_raises_confidence(tmp_path, scheduler):
    teacher = tiny_teacher()
    path = save_tiny_model(tmp_path / "m")
    syn = make(teacher, path, scheduler=scheduler)
    batch = syn.step()
    assert batch.images.shape == (16, 1, 8, 8)
    assert batch.images.min() >= 0 and batch.images.max() <= 1 and torch.isfinite(batch.images).all()
    assert not batch.images.requires_grad
    assert batch.labels.shape == (16,) and batch.teacher_logits.shape == (16, 4)
    # same noise, same labels: the teacher finds the guided samples much more its target classes
    # (measured on 32 images: cross-entropy 1.49-1.50 -> 0.88-0.95, accuracy 0.19-0.31 -> 0.75)
    m = guided_and_plain(syn, teacher)
    assert m["ce_guided"] < m["ce_plain"] - 0.3 and m["acc_guided"] > m["acc_plain"] + 0.25, m


def test_latent_model_with_vae_and_resize(tmp_path):
    teacher = tiny_teacher(channels=3, size=12)
    path = save_tiny_model(tmp_path / "m", channels=3, size=8, latent=True)
    syn = make(teacher, path, steps=4)
    assert syn.model.vae is not None
    batch = syn.step()
    assert batch.images.shape == (16, 3, 12, 12)  # decoded 8x8, resized to the teacher's input
    assert batch.images.min() >= 0 and batch.images.max() <= 1
    m = guided_and_plain(syn, teacher)  # measured: cross-entropy 1.67 -> 1.32 through the VAE
    assert m["ce_guided"] < m["ce_plain"] - 0.15, m


def test_unconditional_model_and_filtering(tmp_path):
    teacher = tiny_teacher()
    path = save_tiny_model(tmp_path / "m", class_conditional=False)
    syn = make(teacher, path, min_confidence=0.5, max_rounds=2, bn=0.1)
    batch = syn.step()
    assert len(batch) == 16 and "syn/kept_fraction" in batch.stats and "syn/prior" in batch.stats
    conf = batch.teacher_logits.softmax(1).gather(1, batch.labels[:, None])[:, 0]
    # passing images come first in the batch: confidence never rises after a failing one
    passed = (conf >= 0.5).tolist()
    assert passed == sorted(passed, reverse=True)


def _js(a, b):
    """Jensen-Shannon divergence between two batches of logits, written out here."""
    pa, pb = a.softmax(1), b.softmax(1)
    m = (pa + pb) / 2
    return float(0.5 * ((pa * (pa / m).log()).sum(1) + (pb * (pb / m).log()).sum(1)).mean())


def test_adversarial_term_uses_student_and_restores_its_mode(tmp_path):
    teacher = tiny_teacher()
    path = save_tiny_model(tmp_path / "m")
    torch.manual_seed(5)
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 4)).train()
    plain = make(teacher, path, adv=0.0).step(student)
    adv = make(teacher, path, adv=3.0).step(student)  # same seed: only the adversarial term differs
    assert "syn/adv" in adv.stats and "syn/adv" not in plain.stats and student.training
    # the term pushes the images towards teacher-student disagreement (measured: JS 0.038 -> 0.060)
    with torch.no_grad():
        js_plain, js_adv = (_js(teacher(b.images), student(b.images)) for b in (plain, adv))
    assert js_adv > js_plain + 0.01, (js_plain, js_adv)
    # without a student the term is off: the same images as adv=0
    assert torch.equal(make(teacher, path, adv=3.0).step(None).images, plain.images)
    student.eval()
    make(teacher, path, adv=3.0).step(student)
    assert not student.training  # an eval-mode student stays in eval mode


def test_resume_same_seed_same_images(tmp_path):
    teacher = tiny_teacher()
    path = save_tiny_model(tmp_path / "m")
    a = make(teacher, path)
    a.step()
    state = a.state_dict()
    nxt = a.step().images
    b = make(teacher, path, seed=123)
    b.load_state_dict(state)
    assert torch.allclose(b.step().images, nxt)


def test_bad_settings_are_one_line_errors(tmp_path):
    teacher = tiny_teacher()
    path = save_tiny_model(tmp_path / "m")
    with pytest.raises(DfkdError, match="not found"):
        make(teacher, tmp_path / "nope")
    with pytest.raises(DfkdError, match="unknown scheduler"):
        make(teacher, path, scheduler="pndm2")
    with pytest.raises(DfkdError, match="channels"):
        make(tiny_teacher(channels=3), path)
    with pytest.raises(DfkdError, match="class_map"):
        make(tiny_teacher(num_classes=7), path)
    with pytest.raises(DfkdError, match="needs synthesizer.path"):
        SYNTHESIZERS.build("diffusion", teacher=teacher)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DfkdError, match="no diffusers UNet"):
        load_diffusion(tmp_path / "empty")


def test_train_diffusion_saves_plain_diffusers_and_resumes(tmp_path):
    from dfkd.diffusion import read_meta, train_diffusion

    torch.manual_seed(0)
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 4, (40,))
    out = tmp_path / "ddpm"
    kw = dict(steps=6, batch_size=8, widths=(8, 16), progress=False, checkpoint_every=2)
    first = train_diffusion(images, labels, 4, out, budget_seconds=0.0, **kw)  # stopped at once
    assert first["steps_done"] == 0 and not first["finished"] and (out / "train_state.pt").is_file()
    done = train_diffusion(images, labels, 4, out, **kw)  # the same command again continues
    assert done["steps_done"] == 6 and done["finished"]
    meta = read_meta(out)
    assert meta["null_class"] == 4 and meta["steps_done"] == 6
    # plain diffusers loads it, class-conditional with the null class
    unet = diffusers.UNet2DModel.from_pretrained(str(out / "unet"))
    assert unet.config.num_class_embeds == 5 and unet.config.sample_size == 8
    diffusers.DDPMScheduler.from_pretrained(str(out / "scheduler"))
    # and the synthesizer samples it, with classifier-free guidance
    syn = make(tiny_teacher(), out, cfg=2.0)
    assert syn.step().images.shape == (16, 1, 8, 8)
    with pytest.raises(DfkdError, match="other settings"):
        train_diffusion(images, labels, 4, out, **{**kw, "steps": 7})


def test_commands_end_to_end(tmp_path, cache_dir):
    """dfkd-synthesize → dfkd-train-diffusion → dfkd-distill synthesizer=diffusion, tiny."""
    from conftest import run_cli_many

    from dfkd.bench import compose
    from dfkd.cli.synthesize import run_synthesize
    from dfkd.pipeline import run_distill

    base = ["teacher.train.epochs=3", "progress=false", "threads=1", "device=cpu"]
    ds, model = tmp_path / "ds", tmp_path / "ddpm"
    run_synthesize(compose("synthesize", [*base, f"output={ds}", "num_images=64", "shard_size=64",
                                          "synthesizer.iterations=5", "synthesizer.batch_size=64"]))
    args = [f"dataset={ds}", f"output={model}", "steps=4", "batch_size=16", "widths=[8,16]", "progress=false",
            "threads=1", "device=cpu"]
    # the training command, then two bad inputs: each in a process of its own, one after the other
    bad_inputs = [([f"dataset={tmp_path / 'nope'}", f"output={model}"], "not found"),
                  ([f"dataset={ds}", f"output={model}", "widths=[8,12]"], "divisible")]
    env = {"DFKD_CACHE": str(cache_dir)}
    r, *bad_runs = run_cli_many([("dfkd-train-diffusion", args, env)]
                                + [("dfkd-train-diffusion", [*bad, "progress=false"], env) for bad, _ in bad_inputs],
                                preload=("diffusers",))
    assert r.returncode == 0, r.stderr
    assert "4 steps" in r.stdout and (model / "unet" / "config.json").is_file()
    summary = run_distill(compose("distill", [
        *base, "synthesizer=diffusion", f"synthesizer.path={model}", "synthesizer.batch_size=16",
        "synthesizer.steps=2", "student=small_cnn", "distill.rounds=2", "distill.kd_steps=2",
        "distill.batch_size=16", "distill.eval_every=0", "resume=false"]), tmp_path / "run")
    assert summary["synthesizer"] == "diffusion" and summary["rounds"] == 2
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and all("syn/teacher_acc" in r for r in rows)
    # the reported top-1 is the saved student's accuracy on the digits test split, recomputed here
    from safetensors.torch import load_file

    from dfkd.data import load_dataset
    from dfkd.models import build_model

    build = json.loads((tmp_path / "run" / "student.json").read_text())
    net = build_model("small_cnn", **build["kwargs"])
    net.load_state_dict(load_file(str(tmp_path / "run" / "student.safetensors")))
    test = load_dataset("digits", train=False).test
    x, y = test.images.float(), test.labels
    x = x / 255 if test.images.dtype == torch.uint8 else x
    mean, std = (torch.tensor(build[k]).view(1, -1, 1, 1) for k in ("mean", "std"))  # the teacher's
    with torch.no_grad():
        pred = net.eval()((x - mean) / std).argmax(1)
    assert summary["student_top1"] == pytest.approx(float((pred == y).float().mean()), abs=1e-6)
    # bad input: one line, exit 2
    for (_, needle), r in zip(bad_inputs, bad_runs):
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr


def save_tiny_text_to_image(root, channels=3, size=8):
    """A tiny randomly initialised text-to-image folder: CLIP text encoder + tokenizer, VAE, UNet2DConditionModel."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in letters:
        vocab[c] = len(vocab)
    for c in letters:
        vocab[c + "</w>"] = len(vocab)
    (root / "vocab").mkdir(parents=True)
    (root / "vocab" / "vocab.json").write_text(json.dumps(vocab))
    (root / "vocab" / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(root / "vocab" / "vocab.json"), str(root / "vocab" / "merges.txt"),
                                     model_max_length=12)
    tok.save_pretrained(str(root / "tokenizer"))
    cfg = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=12,
                                      bos_token_id=0, eos_token_id=1, pad_token_id=1)
    transformers.CLIPTextModel(cfg).save_pretrained(str(root / "text_encoder"))
    diffusers.UNet2DConditionModel(
        sample_size=size // 2, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    ).save_pretrained(str(root / "unet"))
    diffusers.AutoencoderKL(
        in_channels=channels, out_channels=channels, latent_channels=4, block_out_channels=(4, 8),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=size,
    ).save_pretrained(str(root / "vae"))
    diffusers.DDPMScheduler(num_train_timesteps=100).save_pretrained(str(root / "scheduler"))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "text_encoder": ["transformers", "CLIPTextModel"]}))
    return root


def test_text_to_image_prompts_from_class_names(tmp_path):
    teacher = tiny_teacher(channels=3, size=8)
    path = save_tiny_text_to_image(tmp_path / "sd")
    names = ["cat", "dog", "ship", "truck"]
    syn = make(teacher, path, steps=4, class_names=names, cfg=3.0)
    assert syn.model.text_conditional and syn.prompts[2] == "a photo of a ship"
    assert syn.prompt_embeds.shape[0] == 4
    batch = syn.step()
    assert batch.images.shape == (16, 3, 8, 8) and batch.images.min() >= 0 and batch.images.max() <= 1
    m = guided_and_plain(syn, teacher)  # measured: cross-entropy 1.54 -> 1.16
    assert m["ce_guided"] < m["ce_plain"] - 0.15, m
    with pytest.raises(DfkdError, match="class names"):
        make(teacher, path, class_names=names[:2])
    with pytest.raises(DfkdError, match="no tokenizer"):
        import shutil

        shutil.rmtree(path / "tokenizer")
        make(teacher, path, class_names=names)
