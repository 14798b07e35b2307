"""Bad input through the real commands: one line on stderr, exit status 2, no traceback, before long work.

Every command of this file runs once, in a process of its own (``run_cli_many``: forked from one
interpreter that imported torch, hydra and the package once), when the first test asks for it; each
test then checks its own commands' exit status and output.
"""

import importlib.util
import json

import pytest
import torch

from conftest import run_cli_many
from test_byo_teacher import clean_error, image_folder, timm_training_checkpoint

FAST = ["progress=false", "threads=1", "teacher.train.epochs=1"]
DISTILL = "dfkd.cli.distill"

OUT_OF_RANGE = [
    ("synthesizer.batch_size=0", ["synthesizer.batch_size", "positive"]),
    ("synthesizer.iterations=-1", ["synthesizer.iterations", "non-negative"]),
    ("distill.rounds=-5", ["distill.rounds", "positive"]),
    ("distill.pool_size=-1", ["distill.pool_size"]),
    ("distill.lr=-1", ["distill.lr must be positive"]),
    ("student.kwargs.embed_dim=97", ["embed_dim=97 must be divisible by num_heads=4"]),
]

MY_MODELS = ("import torch\n"
             "def build(width=4):\n"
             "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, width))\n")
MY_MODELS2 = ("import torch\n"
              "def build(width=10):\n"
              "    torch.manual_seed(0)\n"
              "    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),\n"
              "                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, width))\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every command of this file, run once: ``{name: CompletedProcess}`` and the folders they used."""
    root = tmp_path_factory.mktemp("bad_input")
    ckpt = root / "last.pth.tar"
    timm_training_checkpoint(ckpt)
    calls = {}
    for override, _ in OUT_OF_RANGE:
        d = root / override.replace("=", "_")
        calls[override] = (DISTILL, [override, *FAST, f"hydra.run.dir={d / 'r'}"], {"DFKD_CACHE": str(d / "c")})
    blocker = root / "a_file"
    blocker.write_text("x")
    calls["unwritable_run"] = (DISTILL, [f"hydra.run.dir={blocker / 'run'}", *FAST])
    calls["unwritable_output"] = ("dfkd.cli.synthesize", [f"output={blocker / 'ds'}", *FAST])
    junk = root / "notes.pt"
    junk.write_text("these are my notes, not weights\n" * 20)
    calls["not_a_checkpoint"] = (DISTILL, [f"teacher.checkpoint={junk}", *FAST, f"hydra.run.dir={root / 'nc'}"])
    timm = ["teacher=timm", "teacher.model=vit_tiny_patch16_224", f"teacher.checkpoint={ckpt}"]
    calls["class_count"] = (DISTILL, [*timm, "data=none", "teacher.num_classes=5", *FAST, f"hydra.run.dir={root / 'cc'}"])
    folder = image_folder(root / "f", classes=("a", "b"), per_class=1, size=8)
    calls["folder_count"] = (DISTILL, [*timm, "data=image_folder", f"data.path={folder}", *FAST,
                                       f"hydra.run.dir={root / 'f1'}"])
    named = image_folder(root / "g", classes=("cat", "zebra"), per_class=1, size=8)
    calls["folder_names"] = (DISTILL, [*timm, "teacher.class_names=[cat,dog,fish]", "data=image_folder",
                                       f"data.path={named}", *FAST, f"hydra.run.dir={root / 'f2'}"])
    calls["folder_missing"] = (DISTILL, ["data=image_folder", f"data.path={root / 'nope'}", *FAST,
                                         f"hydra.run.dir={root / 'f3'}"])
    (root / "my_models.py").write_text(MY_MODELS)
    module = ["teacher=module", "teacher._target_=my_models:build", "teacher.input_size=[3,8,8]"]
    path_env = {"PYTHONPATH": str(root)}
    calls["wrong_width"] = (DISTILL, [*module, "teacher.num_classes=10", "teacher.mean=[0.5,0.5,0.5]",
                                      "teacher.std=[0.5,0.5,0.5]", "data=none", *FAST, f"hydra.run.dir={root / 'w1'}"],
                            path_env)
    calls["no_mean_std"] = (DISTILL, [*module, "data=none", *FAST, f"hydra.run.dir={root / 'w2'}"], path_env)
    # a user's module that trains end to end (the one command here that succeeds)
    (root / "my_models2.py").write_text(MY_MODELS2)
    spec = importlib.util.spec_from_file_location("my_models2", root / "my_models2.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    sd = root / "w.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in m.build().state_dict().items()}}, sd)
    calls["users_module"] = (DISTILL, [
        "teacher=module", "teacher._target_=my_models2:build", f"teacher.checkpoint={sd}",
        "teacher.input_size=[3,16,16]", "teacher.mean=[0.5,0.5,0.5]", "teacher.std=[0.5,0.5,0.5]",
        "student=small_cnn", "data=none", "distill.rounds=1", "distill.kd_steps=1", "synthesizer.iterations=1",
        "synthesizer.batch_size=4", "distill.batch_size=4", *FAST, f"hydra.run.dir={root / 'um'}"], path_env)
    results = dict(zip(calls, run_cli_many(list(calls.values()))))
    return {"root": root, **results}


@pytest.mark.parametrize("override,needles", OUT_OF_RANGE)
def test_settings_out_of_range(runs, override, needles):
    clean_error(runs[override], *needles)
    cache = runs["root"] / override.replace("=", "_") / "c"
    assert not (cache / "teachers").exists()  # found before the teacher was trained


def test_unwritable_output_folders(runs):
    clean_error(runs["unwritable_run"], "hydra.run.dir", "is a file")
    clean_error(runs["unwritable_output"], "output", "is a file")


def test_not_a_checkpoint(runs):
    r = runs["not_a_checkpoint"]
    clean_error(r, "cannot read checkpoint", "notes.pt")
    assert len(r.stderr) < 250, r.stderr  # ours, not torch's long weights-only message


def test_teacher_outputs_disagree_with_its_class_count(runs):
    # the model is built for 5 classes, so the 3-class checkpoint does not fit it
    clean_error(runs["class_count"], "does not fit the model", "head.weight")


def test_folder_that_does_not_fit_the_teacher(runs):
    clean_error(runs["folder_count"], "has 2 classes, the teacher 3")
    clean_error(runs["folder_names"], "'zebra' is not one of the teacher's classes")
    clean_error(runs["folder_missing"], "not a folder")


def test_model_that_returns_the_wrong_width(runs):
    """A user's own module whose output is not (batch, num_classes) for its stated class count."""
    clean_error(runs["wrong_width"], "outputs 4 values per image but its spec says 10 classes")
    clean_error(runs["no_mean_std"], "mean, std could not be found", "teacher.mean")


def test_a_users_module_trains_end_to_end(runs):
    """teacher=module with a _target_ builder: the spec from the config, the student fitted to it."""
    r = runs["users_module"]
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((runs["root"] / "um" / "summary.json").read_text())
    assert s["teacher_spec"]["num_classes"] == 10 and s["teacher_spec"]["sources"]["num_classes"] == "model output"
    assert s["rounds"] == 1 and (runs["root"] / "um" / "student.safetensors").is_file()
