"""Stored synthetic datasets: write, resume, ranks, checksums, reading, export/import, distilling from them."""

import json
import os
import signal

import pytest
import torch

from conftest import run_forked
from dfkd.data.store import (StoreWriter, SyntheticStore, export_image_folder, import_image_folder,
                             state_dict_sha256, teacher_identity)
from dfkd.errors import DfkdError
from generators import build_synthesizer


def _spec(teacher, n=20, shard=6, dtype="uint8", seed=0):
    return {"teacher": teacher_identity(teacher, "small_cnn"), "synthesizer": {"name": "noise", "config": {}},
            "seed": seed, "num_images": n, "shard_size": shard, "image_dtype": dtype,
            "input_size": list(teacher.input_size), "num_classes": teacher.num_classes,
            "class_names": ["a", "b", "c", "d"], "dfkd_version": "test"}


def _write(teacher, root, rank=0, world=1, **kw):
    w = StoreWriter(root, _spec(teacher, **kw))
    make = lambda seed: build_synthesizer("noise", teacher, batch_size=4, seed=seed)  # noqa: E731
    return w, w.run(make, teacher, rank=rank, world=world, progress=False)


def _shard_bytes(root):
    """Each shard's tensors as bytes (safetensors' metadata order is not fixed, the tensors are)."""
    from safetensors.torch import load_file

    return {p.name: {k: v.numpy().tobytes() for k, v in load_file(str(p)).items()}
            for p in sorted((root / "shards").glob("*.safetensors"))}


def test_write_read_round_trip(bn_teacher, tmp_path):
    _, res = _write(bn_teacher, tmp_path / "ds")
    m = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert m["count"] == 20 and m["complete"] and len(m["shards"]) == 4
    assert sum(m["class_counts"]) == 20 and m["teacher"]["sha256"] == state_dict_sha256(bn_teacher.model)
    assert m["teacher"]["mean"] == [0.5] * 3 and m["synthesizer"]["name"] == "noise"
    assert all(len(s["sha256"]) == 64 for s in m["shards"])
    store = SyntheticStore(tmp_path / "ds")
    t = store.load_all()
    assert t["images"].dtype == torch.uint8 and t["images"].shape == (20, 3, 8, 8)
    assert torch.equal(t["index"], torch.arange(20))
    # the stored logits belong to the stored (quantised) pixels
    live = bn_teacher(t["images"].float() / 255)
    assert torch.allclose(t["logits"].float(), live, atol=0.05, rtol=1e-2)
    store.check_teacher(bn_teacher)
    # float16 images on request
    _write(bn_teacher, tmp_path / "f16", dtype="float16")
    assert SyntheticStore(tmp_path / "f16").load_all()["images"].dtype == torch.float16


def test_resume_and_ranks_give_the_same_shards(bn_teacher, tmp_path):
    _write(bn_teacher, tmp_path / "fresh")
    want = _shard_bytes(tmp_path / "fresh")
    # an interrupted run: one shard lost, one half-written temp file, no manifest
    root = tmp_path / "resumed"
    _write(bn_teacher, root)
    (root / "manifest.json").unlink()
    (root / "shards" / "shard-00002.safetensors").unlink()
    (root / "shards" / ".shard-00003.safetensors.x.tmp").write_bytes(b"half")
    with pytest.raises(DfkdError, match="did not finish"):
        SyntheticStore(root)
    w, res = _write(bn_teacher, root)
    assert res["made_this_run"] == 6 and _shard_bytes(root) == want
    assert not list((root / "shards").glob(".*tmp"))
    # two ranks write disjoint shards; the last one writes the manifest
    ranks = tmp_path / "ranks"
    _, r1 = _write(bn_teacher, ranks, rank=1, world=2)
    assert r1["manifest"] is None and not (ranks / "manifest.json").exists()
    _, r0 = _write(bn_teacher, ranks, rank=0, world=2)
    assert r0["manifest"]["count"] == 20 and _shard_bytes(ranks) == want
    # resuming with other settings is refused
    with pytest.raises(DfkdError, match="another"):
        _write(bn_teacher, root, seed=5)


def test_corrupt_truncated_missing_and_other_teacher(bn_teacher, tmp_path):
    root = tmp_path / "ds"
    _write(bn_teacher, root)
    with pytest.raises(DfkdError, match="not found"):
        SyntheticStore(tmp_path / "nope")
    t2 = type(bn_teacher)(bn_teacher.model.__class__(num_classes=4, in_chans=3, width=8), [0.5] * 3, [0.25] * 3,
                          (3, 8, 8), 4)
    with pytest.raises(DfkdError, match="another teacher"):
        SyntheticStore(root).check_teacher(t2)
    p = root / "shards" / "shard-00001.safetensors"
    blob = bytearray(p.read_bytes())
    blob[-3] ^= 0xFF
    p.write_bytes(bytes(blob))
    with pytest.raises(DfkdError, match="corrupt"):
        SyntheticStore(root).load_all()
    p.write_bytes(bytes(blob[:100]))
    with pytest.raises(DfkdError, match="truncated"):
        SyntheticStore(root).load_all()


def test_stored_synthesizer_epochs_and_state(bn_teacher, tmp_path):
    _write(bn_teacher, tmp_path / "ds")
    a = build_synthesizer("stored", None, path=str(tmp_path / "ds"), batch_size=8, seed=1)
    seen = torch.cat([a.step().images for _ in range(5)])  # 40 > 20: one full shuffled epoch, then the next
    first = SyntheticStore(tmp_path / "ds").load_all()
    assert {tuple(x.flatten().tolist()) for x in seen[:16]} <= {tuple((y / 255).flatten().tolist()) for y in first["images"]}
    b = build_synthesizer("stored", bn_teacher, path=str(tmp_path / "ds"), batch_size=8, seed=9, logits="teacher")
    b.load_state_dict(a.state_dict())
    ba, bb = a.step(), b.step()
    assert torch.equal(ba.images, bb.images) and torch.equal(ba.labels, bb.labels)
    assert torch.allclose(ba.teacher_logits, bb.teacher_logits, atol=0.05, rtol=1e-2)  # stored fp16 vs live


def test_export_is_an_image_folder_and_imports_back(bn_teacher, tmp_path):
    from torchvision.datasets import ImageFolder

    _write(bn_teacher, tmp_path / "ds")
    store = SyntheticStore(tmp_path / "ds")
    out = export_image_folder(store, tmp_path / "img", progress=False)
    ds = ImageFolder(str(out), allow_empty=True)  # noise images may leave a class empty
    meta = json.loads((out / "labels.json").read_text())
    assert len(ds) == 20 and ds.classes == meta["classes"]
    by_file = {s["file"]: s["label"] for s in meta["samples"]}
    for path, k in ds.samples:
        assert by_file[os.path.relpath(path, out).replace(os.sep, "/")] == k
    assert (out / "labels.csv").read_text().count("\n") == 21
    spec = _spec(bn_teacher, shard=8)
    m = import_image_folder(out, tmp_path / "back", spec, teacher=bn_teacher)
    assert m["count"] == 20
    a, b = store.load_all(), SyntheticStore(tmp_path / "back").load_all()
    order = torch.argsort(a["labels"] * 1000 + a["index"])
    assert torch.equal(a["images"][order], b["images"]) and torch.equal(a["labels"][order], b["labels"])


def test_distil_from_stored_matches_online(tmp_path, cache_dir):
    """Same images, same seed: stored fp16 logits (no teacher) vs the teacher queried live.

    At this size (digits, 256 DeepInversion images, small_cnn student, 30 rounds) the seed-to-seed
    spread of student top-1 is about 0.02; the two arms must agree within 0.03.
    """
    from dfkd.bench import compose
    from dfkd.cli.synthesize import run_synthesize
    from dfkd.pipeline import run_distill

    base = ["teacher.train.epochs=3", "progress=false", "threads=1", "device=cpu"]
    ds = tmp_path / "ds"
    s = run_synthesize(compose("synthesize", [*base, f"output={ds}", "num_images=256", "shard_size=64",
                                              "synthesizer.iterations=10", "synthesizer.batch_size=64"]))
    assert s["count"] == 256 and s["complete"]
    common = [*base, "synthesizer=stored", f"synthesizer.path={ds}", "synthesizer.batch_size=64",
              "student=small_cnn", "distill.rounds=30", "distill.kd_steps=5", "distill.batch_size=64",
              "distill.eval_every=0", "distill.checkpoint_every=0", "distill.warmup=0",
              "augment.crop_padding=0", "augment.flip=false", "distill.mix=none", "resume=false", "seed=0"]
    stored = run_distill(compose("distill", [*common, "distill.teacher_logits=stored"]), tmp_path / "stored")
    live = run_distill(compose("distill", [*common, "distill.teacher_logits=live"]), tmp_path / "live")
    assert stored["teacher_top1"] is None and live["teacher_top1"] > 0.9
    assert stored["student_top1"] > 0.5
    assert abs(stored["student_top1"] - live["student_top1"]) <= 0.03, (stored["student_top1"], live["student_top1"])


# what a digits teacher checkpoint carries beside it (its JSON): how to build it and what it takes
DIGITS_TEACHER_BUILD = {"model": "small_cnn", "kwargs": {"in_chans": 1, "width": 32, "num_classes": 10},
                        "input_size": [1, 8, 8], "num_classes": 10, "mean": [0.3], "std": [0.4]}


def _teacher_ckpt(tmp_path, name="teacher", seed=0):
    from dfkd.models import build_model
    from dfkd.models.checkpoint import save_model

    torch.manual_seed(seed)
    path = tmp_path / f"{name}.safetensors"
    save_model(build_model("small_cnn", num_classes=10, in_chans=1, width=32), path,  # the digits_cnn config's width
               build=DIGITS_TEACHER_BUILD)
    return path


def _one_line_exit_2(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    err = r.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err


# Runs dfkd-synthesize and SIGKILLs its own process while shard 3 is half written (three shards and
# their sidecars complete, shard 3's temporary file holding half its bytes, no manifest): the kill
# lands at the same point on every run, however fast or loaded the machine is.
_KILL_MID_SHARD = """
import os, signal, sys, tempfile
import dfkd.data.store as store
from pathlib import Path

def write_half_then_die(path, data):
    path = Path(path)
    if path.name.startswith("shard-00003") and path.suffix == ".safetensors":
        fd, _ = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.write(fd, data[: len(data) // 2])
        os.fsync(fd)
        os.kill(os.getpid(), signal.SIGKILL)
    write(path, data)

write = store.atomic_write_bytes
store.atomic_write_bytes = write_half_then_die
from dfkd.cli.synthesize import main
sys.argv = ["dfkd-synthesize", *sys.argv[1:]]
main()
"""


def test_sigkill_synthesize_then_rerun_completes(tmp_path, capsys):
    ckpt = _teacher_ckpt(tmp_path)
    ds = tmp_path / "ds"
    args = [f"teacher.checkpoint={ckpt}", f"output={ds}", "num_images=40", "shard_size=4",
            "synthesizer.iterations=8", "synthesizer.batch_size=4", "progress=false", "threads=1", "device=cpu"]
    env = {"OMP_NUM_THREADS": "1"}
    killed = run_forked(*args, code=_KILL_MID_SHARD, env=env)  # each command a process of its own
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (ds / "manifest.json").exists()
    assert sorted(p.name for p in (ds / "shards").glob("shard-*.json")) == [f"shard-0000{i}.json" for i in range(3)]
    assert len(list((ds / "shards").glob(".shard-00003.safetensors.*.tmp"))) == 1  # the half-written shard
    r = run_forked("dfkd-synthesize", *args, env=env)
    assert r.returncode == 0, r.stderr
    assert "40 images, complete; 28 made" in r.stdout, r.stdout  # the three finished shards were kept
    store = SyntheticStore(ds)  # verify=True: every shard passes its checksum
    t = store.load_all()
    assert len(store) == 40 and len(t["images"]) == 40 and store.manifest["complete"]
    assert torch.equal(t["index"].sort().values, torch.arange(40))  # no duplicates, none missing
    assert not list((ds / "shards").glob(".*tmp"))
    # inspect (in-process: same entry point, no interpreter start-up): summary, histogram, grid PNG
    from dfkd.cli.inspect import main as inspect_main

    inspect_main([str(ds), "--grid", str(tmp_path / "grid.png")])
    out = capsys.readouterr().out
    assert "40 of 40" in out and "class histogram" in out and (tmp_path / "grid.png").is_file()

    def inspect_fails(*needles):
        with pytest.raises(SystemExit) as e:
            inspect_main([str(x) for x in args_])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1, err
        assert all(n in err for n in needles), err

    args_ = [tmp_path / "missing"]
    inspect_fails("dfkd-inspect: error:", "not found")
    blob = (ds / "shards" / "shard-00004.safetensors").read_bytes()
    (ds / "shards" / "shard-00004.safetensors").write_bytes(blob[: len(blob) // 2])
    args_ = [ds]
    inspect_fails("truncated", "shard-00004")
    (ds / "shards" / "shard-00004.safetensors").write_bytes(blob)
    other = _teacher_ckpt(tmp_path, "other", seed=1)
    _one_line_exit_2(run_forked("dfkd-distill", "synthesizer=stored", f"synthesizer.path={ds}",
                                f"teacher.checkpoint={other}", f"hydra.run.dir={tmp_path / 'run'}"),
                     "another teacher")
