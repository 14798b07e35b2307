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
from generators.diffusion import guidance_gain, load_diffusion  # noqa: E402


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
    # same seed, same labels: the guided samples are more confidently the target class
    gain = guidance_gain(syn, n=32)
    assert gain["guided"] > gain["unguided"] + 0.05, gain


def test_latent_model_with_vae_and_resize(tmp_path):
    teacher = tiny_teacher(channels=3, size=12)
    path = save_tiny_model(tmp_path / "m", channels=3, size=8, latent=True)
    syn = make(teacher, path, steps=4)
    assert syn.model.vae is not None
    batch = syn.step()
    assert batch.images.shape == (16, 3, 12, 12)  # decoded 8x8, resized to the teacher's input
    assert batch.images.min() >= 0 and batch.images.max() <= 1
    gain = guidance_gain(syn, n=32)
    assert gain["guided"] > gain["unguided"], gain


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


def test_adversarial_term_uses_student_and_restores_its_mode(tmp_path):
    teacher = tiny_teacher()
    syn = make(teacher, save_tiny_model(tmp_path / "m"), adv=1.0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 4)).train()
    batch = syn.step(student)
    assert "syn/adv" in batch.stats and student.training


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
    from conftest import run_cli

    from dfkd.bench import compose
    from dfkd.cli.synthesize import run_synthesize
    from dfkd.pipeline import run_distill

    base = ["teacher.train.epochs=3", "progress=false", "threads=1", "device=cpu"]
    ds, model = tmp_path / "ds", tmp_path / "ddpm"
    run_synthesize(compose("synthesize", [*base, f"output={ds}", "num_images=64", "shard_size=64",
                                          "synthesizer.iterations=5", "synthesizer.batch_size=64"]))
    args = [f"dataset={ds}", f"output={model}", "steps=4", "batch_size=16", "widths=[8,16]", "progress=false",
            "threads=1", "device=cpu"]
    r = run_cli("dfkd-train-diffusion", *args, env={"DFKD_CACHE": str(cache_dir)})
    assert r.returncode == 0, r.stderr
    assert "4 steps" in r.stdout and (model / "unet" / "config.json").is_file()
    summary = run_distill(compose("distill", [
        *base, "synthesizer=diffusion", f"synthesizer.path={model}", "synthesizer.batch_size=16",
        "synthesizer.steps=2", "student=small_cnn", "distill.rounds=2", "distill.kd_steps=2",
        "distill.batch_size=16", "distill.eval_every=0", "resume=false"]), tmp_path / "run")
    assert 0.0 <= summary["student_top1"] <= 1.0 and summary["synthesizer"] == "diffusion"
    # bad input: one line, exit 2
    for bad, needle in [([f"dataset={tmp_path / 'nope'}", f"output={model}"], "not found"),
                        ([f"dataset={ds}", f"output={model}", "widths=[8,12]"], "divisible")]:
        r = run_cli("dfkd-train-diffusion", *bad, "progress=false", env={"DFKD_CACHE": str(cache_dir)})
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
    gain = guidance_gain(syn, n=32)
    assert gain["guided"] > gain["unguided"], gain
    with pytest.raises(DfkdError, match="class names"):
        make(teacher, path, class_names=names[:2])
    with pytest.raises(DfkdError, match="no tokenizer"):
        import shutil

        shutil.rmtree(path / "tokenizer")
        make(teacher, path, class_names=names)
