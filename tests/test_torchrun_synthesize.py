"""``dfkd-synthesize`` under a real two-process ``torchrun`` (Gloo, CPU) on a cold teacher cache:
rank 0 trains and caches the teacher once while rank 1 waits, the ranks write disjoint shards,
and the manifest lists all of them — the same shards one process writes."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ["num_images=24", "shard_size=6", "synthesizer.iterations=2", "synthesizer.batch_size=8",
        "teacher.train.epochs=1", "teacher.kwargs.width=4", "progress=false", "threads=1", "device=cpu", "seed=3"]


def _shard_tensors(root):
    from safetensors.torch import load_file

    return {p.name: {k: v.numpy().tobytes() for k, v in load_file(str(p)).items()}
            for p in sorted((root / "shards").glob("*.safetensors"))}


def test_two_ranks_train_the_teacher_once_and_write_disjoint_shards(tmp_path, monkeypatch):
    import torch

    from dfkd.data.store import SyntheticStore

    cache, ds = tmp_path / "cache", tmp_path / "ds"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "dfkd.cli.synthesize", *ARGS, f"output={ds}", f"hydra.run.dir={tmp_path / 'logs'}"]
    env = {**os.environ, "DFKD_CACHE": str(cache), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("DFKD_REQUIRE_DATA", None)
    r = subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=240, stdin=subprocess.DEVNULL)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    # one teacher training (rank 0), one load of the cached teacher (rank 1, after the barrier)
    assert out.count("teacher: training") == 1, out[-3000:]
    assert out.count("teacher: cached") == 1, out[-3000:]
    assert len(list((cache / "teachers").glob("*.safetensors"))) == 1
    # rank 0 made shards 0 and 2 (12 images) and wrote the manifest; rank 1 made shards 1 and 3
    assert "rank 1: wrote its shards" in out and "24 images, complete; 12 made" in out, out[-3000:]
    store = SyntheticStore(ds)  # every shard checked against its sha256
    assert store.manifest["complete"] and len(store) == 24
    assert [s["index"] for s in store.manifest["shards"]] == [0, 1, 2, 3]
    t = store.load_all()
    assert torch.equal(t["index"], torch.arange(24))  # disjoint and complete: no sample twice, none missing
    # the same command in one process (the teacher now cached) writes the same shards, byte for byte
    from dfkd.bench import compose
    from dfkd.cli.synthesize import run_synthesize

    monkeypatch.setenv("DFKD_CACHE", str(cache))
    one = run_synthesize(compose("synthesize", [*ARGS, f"output={tmp_path / 'one'}"]))
    assert one["complete"] and one["world_size"] == 1
    assert _shard_tensors(tmp_path / "one") == _shard_tensors(ds)
