"""Bad input through the real commands: one line on stderr, exit status 2, no traceback, before long work."""

import pytest
import torch

from test_byo_teacher import VIT, clean_error, cli, image_folder, timm_training_checkpoint

FAST = ["progress=false", "threads=1", "teacher.train.epochs=1"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    p = tmp_path_factory.mktemp("t") / "last.pth.tar"
    timm_training_checkpoint(p)
    return p


@pytest.mark.parametrize("override,needles", [
    ("synthesizer.batch_size=0", ["synthesizer.batch_size", "positive"]),
    ("synthesizer.iterations=-1", ["synthesizer.iterations", "non-negative"]),
    ("distill.rounds=-5", ["distill.rounds", "positive"]),
    ("distill.pool_size=-1", ["distill.pool_size"]),
    ("distill.lr=-1", ["distill.lr must be positive"]),
    ("student.kwargs.embed_dim=97", ["embed_dim=97 must be divisible by num_heads=4"]),
])
def test_settings_out_of_range(tmp_path, override, needles):
    clean_error(cli("dfkd.cli.distill", override, *FAST, f"hydra.run.dir={tmp_path / 'r'}",
                    env={"DFKD_CACHE": str(tmp_path / "c")}), *needles)
    assert not (tmp_path / "c" / "teachers").exists()  # found before the teacher was trained


def test_unwritable_output_folders(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    clean_error(cli("dfkd.cli.distill", f"hydra.run.dir={blocker / 'run'}", *FAST), "hydra.run.dir", "is a file")
    clean_error(cli("dfkd.cli.synthesize", f"output={blocker / 'ds'}", *FAST), "output", "is a file")


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "notes.pt"
    junk.write_text("these are my notes, not weights\n" * 20)
    r = cli("dfkd.cli.distill", f"teacher.checkpoint={junk}", *FAST, f"hydra.run.dir={tmp_path / 'r'}")
    clean_error(r, "cannot read checkpoint", "notes.pt")
    assert len(r.stderr) < 250, r.stderr  # ours, not torch's long weights-only message


def test_teacher_outputs_disagree_with_its_class_count(tmp_path, ckpt):
    r = cli("dfkd.cli.distill", "teacher=timm", "teacher.model=vit_tiny_patch16_224", f"teacher.checkpoint={ckpt}",
            "data=none", "teacher.num_classes=5", *FAST, f"hydra.run.dir={tmp_path / 'r'}")
    # the model is built for 5 classes, so the 3-class checkpoint does not fit it
    clean_error(r, "does not fit the model", "head.weight")


def test_folder_that_does_not_fit_the_teacher(tmp_path, ckpt):
    folder = image_folder(tmp_path / "f", classes=("a", "b"), per_class=1, size=8)
    clean_error(cli("dfkd.cli.distill", "teacher=timm", "teacher.model=vit_tiny_patch16_224",
                    f"teacher.checkpoint={ckpt}", "data=image_folder", f"data.path={folder}", *FAST,
                    f"hydra.run.dir={tmp_path / 'r'}"), "has 2 classes, the teacher 3")
    named = image_folder(tmp_path / "g", classes=("cat", "zebra"), per_class=1, size=8)
    clean_error(cli("dfkd.cli.distill", "teacher=timm", "teacher.model=vit_tiny_patch16_224",
                    f"teacher.checkpoint={ckpt}", "teacher.class_names=[cat,dog,fish]", "data=image_folder",
                    f"data.path={named}", *FAST, f"hydra.run.dir={tmp_path / 'r2'}"),
                "'zebra' is not one of the teacher's classes")
    clean_error(cli("dfkd.cli.distill", "data=image_folder", f"data.path={tmp_path / 'nope'}", *FAST,
                    f"hydra.run.dir={tmp_path / 'r3'}"), "not a folder")


def test_model_that_returns_the_wrong_width(tmp_path):
    """A user's own module whose output is not (batch, num_classes) for its stated class count."""
    mod = tmp_path / "my_models.py"
    mod.write_text("import torch\n"
                   "def build(width=4):\n"
                   "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, width))\n")
    r = cli("dfkd.cli.distill", "teacher=module", "teacher._target_=my_models:build", "teacher.input_size=[3,8,8]",
            "teacher.num_classes=10", "teacher.mean=[0.5,0.5,0.5]", "teacher.std=[0.5,0.5,0.5]", "data=none", *FAST,
            f"hydra.run.dir={tmp_path / 'r'}", env={"PYTHONPATH": str(tmp_path)})
    clean_error(r, "outputs 4 values per image but its spec says 10 classes")
    r = cli("dfkd.cli.distill", "teacher=module", "teacher._target_=my_models:build", "teacher.input_size=[3,8,8]",
            "data=none", *FAST, f"hydra.run.dir={tmp_path / 'r2'}", env={"PYTHONPATH": str(tmp_path)})
    clean_error(r, "mean, std could not be found", "teacher.mean")


def test_a_users_module_trains_end_to_end(tmp_path):
    """teacher=module with a _target_ builder: the spec from the config, the student fitted to it."""
    mod = tmp_path / "my_models2.py"
    mod.write_text("import torch\n"
                   "def build(width=10):\n"
                   "    torch.manual_seed(0)\n"
                   "    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),\n"
                   "                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, width))\n")
    sd = tmp_path / "w.pt"
    import importlib.util

    spec = importlib.util.spec_from_file_location("my_models2", mod)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    torch.save({"state_dict": {f"module.{k}": v for k, v in m.build().state_dict().items()}}, sd)
    r = cli("dfkd.cli.distill", "teacher=module", "teacher._target_=my_models2:build", f"teacher.checkpoint={sd}",
            "teacher.input_size=[3,16,16]", "teacher.mean=[0.5,0.5,0.5]", "teacher.std=[0.5,0.5,0.5]",
            "student=small_cnn", "data=none", "distill.rounds=1", "distill.kd_steps=1", "synthesizer.iterations=1",
            "synthesizer.batch_size=4", "distill.batch_size=4", *FAST, f"hydra.run.dir={tmp_path / 'r'}",
            env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["teacher_spec"]["num_classes"] == 10 and s["teacher_spec"]["sources"]["num_classes"] == "model output"
