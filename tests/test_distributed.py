"""Two ranks under torchrun (Gloo on CPU): the ranks agree on the student, their samples differ."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_two_ranks_agree_on_student_and_differ_in_samples(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "dfkd.cli.distill", "teacher.train.epochs=2", "distill.rounds=3", "distill.kd_steps=2",
           "synthesizer.iterations=2", "synthesizer.batch_size=16", "distill.batch_size=16",
           "distill.checkpoint_every=1", "progress=false", "threads=1", f"hydra.run.dir={run}"]
    env = {**os.environ, "DFKD_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    # the head of stderr too: a rank that fails early is named there, the launcher's summary comes last
    assert r.returncode == 0, r.stderr[:3000] + "\n[...]\n" + r.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    ranks = summary["ranks"]
    assert [x["rank"] for x in ranks] == [0, 1]
    assert ranks[0]["student_digest"] == ranks[1]["student_digest"]
    assert ranks[0]["memory_digest"] != ranks[1]["memory_digest"]
    assert (run / "checkpoint.rank0.pt").is_file() and (run / "checkpoint.rank1.pt").is_file()
    rounds = [json.loads(x)["round"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3]  # only rank 0 logs
