"""Detection datasets on disk: ``dfkd-synthesize task=detection`` writes images with the teacher's boxes in
the shards, the store reads them back exactly, a resumed run rewrites a lost shard byte for byte, and the
store trains a detector (``train_detector``) and feeds ``dfkd-distill task=detection synthesizer=stored``.

The teacher is a tiny grayscale FCOS trained for 20 steps on squares in noise (enough for detections of
varying number per image at score 0.25); the commands run through their console entry point in this process.
"""

import json
import sys

import pytest
import torch

from dfkd.errors import DfkdError

pytestmark = pytest.mark.usefixtures("one_thread")

N, SHARD, THRESH, K = 8, 4, 0.25, 3
SMALL = [f"num_images={N}", f"shard_size={SHARD}", f"synthesizer.batch_size={SHARD}",
         f"detection.score_thresh={THRESH}", "threads=1", "device=cpu", "progress=false"]


def _rectangles(n: int = 32, k: int = 3):
    """Grey noise images with one or two squares whose brightness is their class: a detection set in memory."""
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(n):
        x = torch.rand(1, 32, 32, generator=g) * 0.3
        boxes, labels = [], []
        for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
            side = int(torch.randint(8, 17, (1,), generator=g))
            x0, y0 = (int(v) for v in torch.randint(0, 32 - side, (2,), generator=g))
            c = int(torch.randint(0, k, (1,), generator=g))
            x[:, y0:y0 + side, x0:x0 + side] = 0.5 + 0.25 * c
            boxes.append([x0, y0, x0 + side, y0 + side])
            labels.append(c)
        data.append((x, {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)}))
    return data


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    from dfkd.detection.models import build_detector, save_detector
    from dfkd.detection.train import train_detector

    root = tmp_path_factory.mktemp("det_store")
    torch.manual_seed(0)
    model = build_detector("fcos", "small_cnn", num_classes=K, image_size=32, in_chans=1, mean=(0.4,), std=(0.3,),
                           width=8, fpn_channels=16, head_convs=1)
    train_detector(model, _rectangles(k=K), steps=20, lr=3e-3, batch_size=8, progress=False)
    save_detector(model, root / "det.safetensors")
    return root / "det.safetensors"


def synthesize(*args, capsys=None):
    """``dfkd-synthesize ARGS`` through its console entry point; returns (exit status, stdout, stderr)."""
    from dfkd.cli.synthesize import main

    argv = sys.argv
    sys.argv = ["dfkd-synthesize", *map(str, args)]
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
    out = capsys.readouterr() if capsys is not None else None
    return code, (out.out if out else ""), (out.err if out else "")


def det_args(teacher_file, out, synthesizer="box_inversion"):
    return ["task=detection", "teacher=detector", f"teacher.checkpoint={teacher_file}", f"synthesizer={synthesizer}",
            f"output={out}", *SMALL, *(["synthesizer.iterations=3"] if synthesizer == "box_inversion" else [])]


@pytest.fixture(scope="module")
def written(teacher_file, tmp_path_factory):
    """One box-inversion store, with what the writer handed to the shard encoder recorded."""
    import dfkd.data.store as store

    out = tmp_path_factory.mktemp("ds") / "ds"
    seen = []
    encode = store.encode_detection_shard

    def recording(images, index, detections, targets, meta):
        seen.append({"images": images.clone(), "index": index.clone(), "meta": dict(meta),
                     "detections": [{k: v.clone() for k, v in d.items()} for d in detections],
                     "targets": [{k: v.clone() for k, v in t.items()} for t in targets]})
        return encode(images, index, detections, targets, meta)

    store.encode_detection_shard = recording
    try:
        code, _, _ = synthesize(*det_args(teacher_file, out))
    finally:
        store.encode_detection_shard = encode
    assert code == 0
    return out, seen


def _same(a: list[dict], b: list[dict], keys) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in keys:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k].cpu(), y[k].cpu()), k


def test_store_round_trips_the_boxes_that_were_written(teacher_file, written):
    from dfkd.data.store import SyntheticStore, shard_seed, state_dict_sha256, to_float
    from dfkd.detection.models import DetectionTeacher, load_detector
    from generators.box_inversion import BoxInversion

    out, seen = written
    m = json.loads((out / "manifest.json").read_text())
    assert m["task"] == "detection" and m["complete"] and m["count"] == N and len(m["shards"]) == N // SHARD
    model = load_detector(teacher_file)
    assert m["teacher"]["sha256"] == state_dict_sha256(model) and m["teacher"]["architecture"] == "fcos/small_cnn"
    assert m["teacher_checkpoint"] == "det.safetensors" and m["score_thresh"] == THRESH
    assert m["input_size"] == [1, 32, 32] and m["class_names"] == [str(k) for k in range(K)]
    assert m["synthesizer"]["name"] == "box_inversion" and m["synthesizer"]["config"]["adi"] == 0.0

    store = SyntheticStore(out)
    t = store.load_all()
    assert t["images"].dtype == torch.uint8 and t["images"].shape == (N, 1, 32, 32)
    assert torch.equal(t["index"], torch.arange(N))
    dets, aimed = store.targets(), store.targets("synthesizer")
    # exactly what the writer encoded: images, the teacher's detections (boxes, labels, scores), the targets
    assert torch.equal(t["images"], torch.cat([s["images"] for s in seen]))
    _same(dets, [d for s in seen for d in s["detections"]], ("boxes", "labels", "scores"))
    _same(aimed, [d for s in seen for d in s["targets"]], ("boxes", "labels"))
    counts = [len(d["boxes"]) for d in dets]
    assert len(set(counts)) > 1 and sum(counts) > 0, counts  # a variable number of boxes per image
    assert m["box_count"] == sum(counts) == sum(s["boxes"] for s in m["shards"])
    assert m["class_counts"] == torch.bincount(t["box_labels"], minlength=K).tolist()
    # ... which are the teacher's detections on the stored (quantised) pixels, score >= the threshold
    teacher = DetectionTeacher(model)
    for i in range(N // SHARD):
        live = teacher.detect(to_float(t["images"][i * SHARD:(i + 1) * SHARD]), score_thresh=THRESH)
        _same(dets[i * SHARD:(i + 1) * SHARD], live, ("boxes", "labels", "scores"))
        # and the synthesizer's targets start with the boxes it sampled from the shard's own seed
        syn = BoxInversion(teacher, batch_size=SHARD, seed=shard_seed(0, i), boxes_per_image=2, size=(0.2, 0.6))
        for got, want in zip(aimed[i * SHARD:(i + 1) * SHARD], syn.sample_targets()):
            assert torch.equal(got["boxes"][:2], want["boxes"]) and torch.equal(got["labels"][:2], want["labels"])
    assert all(float(d["scores"].min()) >= THRESH for d in dets if len(d["scores"]))


def test_inspect_summarises_a_detection_dataset(written, tmp_path, capsys):
    from dfkd.cli.inspect import main as inspect_main

    out = written[0]
    inspect_main([str(out), "--grid", str(tmp_path / "grid.png")])
    text = capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert "(detection)" in text and f"{m['box_count']} teacher detections with score >= {THRESH}" in text, text
    assert "boxes per class (teacher | synthesizer targets)" in text and (tmp_path / "grid.png").is_file()
    with pytest.raises(SystemExit) as e:  # export writes class folders: one line for a detection dataset
        inspect_main([str(out), "--grid", str(tmp_path / "g2.png"), "--export", str(tmp_path / "exp")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "detection dataset" in err, err


def test_resumed_run_rewrites_a_lost_shard_byte_for_byte(teacher_file, written, tmp_path, capsys):
    import shutil

    from dfkd.data.store import SyntheticStore

    out = tmp_path / "ds"
    shutil.copytree(written[0], out)
    side = json.loads((out / "shards" / "shard-00001.json").read_text())
    before = json.loads((out / "manifest.json").read_text())
    for p in (out / "shards").glob("shard-00001.*"):
        p.unlink()
    (out / "manifest.json").unlink()
    code, stdout, _ = synthesize(*det_args(teacher_file, out), capsys=capsys)
    assert code == 0 and f"{N} images, complete; {SHARD} made" in stdout, stdout
    assert json.loads((out / "shards" / "shard-00001.json").read_text()) == side  # same sha256, bytes, boxes
    after = json.loads((out / "manifest.json").read_text())
    assert {k: v for k, v in after.items() if not k.startswith("wall")} == \
           {k: v for k, v in before.items() if not k.startswith("wall")}
    assert len(SyntheticStore(out).targets()) == N  # verify=True: every shard passes its checksum
    # a resume with another score threshold is another dataset: one line, exit 2
    code, _, err = synthesize(*det_args(teacher_file, out), "detection.score_thresh=0.35", capsys=capsys)
    assert code == 2 and "another score_thresh" in err and len(err.strip().splitlines()) == 1, err


def test_detection_shards_are_deterministic_bytes():
    from dfkd.data.store import encode_detection_shard, flatten_boxes, split_boxes

    images = torch.randint(0, 255, (3, 1, 8, 8), dtype=torch.uint8)
    dets = [{"boxes": torch.tensor([[0.0, 1.0, 4.5, 6.0]]), "labels": torch.tensor([2]), "scores": torch.tensor([0.7])},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)},
            {"boxes": torch.rand(2, 4) * 8, "labels": torch.tensor([0, 1]), "scores": torch.tensor([0.9, 0.5])}]
    meta = {"shard": 0, "seed": 1, "format": 1, "task": "detection", "x": "y"}
    a = encode_detection_shard(images, torch.arange(3), dets, None, meta)
    assert all(encode_detection_shard(images, torch.arange(3), dets, None, dict(reversed(meta.items()))) == a
               for _ in range(5))  # one metadata entry: safetensors' unordered map cannot reorder it
    flat = flatten_boxes(dets)
    assert flat["box_counts"].tolist() == [1, 0, 2] and flat["boxes"].shape == (3, 4)
    _same(split_boxes(flat), dets, ("boxes", "labels", "scores"))


def test_store_dataset_trains_a_detector_and_feeds_distillation(teacher_file, written, tmp_path):
    from dfkd.data.store import SyntheticStore
    from dfkd.detection.models import build_detector
    from dfkd.detection.train import collate, train_detector

    store = SyntheticStore(written[0])
    ds = store.dataset()
    assert len(ds) == N and ds.num_classes == K
    image, target = ds[0]
    assert image.dtype == torch.float32 and image.shape == (1, 32, 32) and 0 <= float(image.min()) <= 1
    assert set(target) == {"boxes", "labels", "scores"} and target["boxes"].dtype == torch.float32
    _, targets = collate([ds[i] for i in range(N)])
    _same(targets, store.targets(), ("boxes", "labels", "scores"))
    fewer = store.dataset(score_thresh=0.3).targets  # a higher cut-off than the stored one keeps a subset
    assert all(len(a["boxes"]) <= len(b["boxes"]) and bool((a["scores"] >= 0.3).all()) for a, b in zip(fewer, targets))
    assert len(store.dataset(boxes="synthesizer").targets[0]["boxes"]) >= 2

    torch.manual_seed(0)
    student = build_detector("fcos", "small_cnn", num_classes=K, image_size=32, in_chans=1, mean=(0.4,), std=(0.3,),
                             width=4, fpn_channels=8, head_convs=1)
    before = [p.detach().clone() for p in student.parameters()]
    logs = []
    train_detector(student, store.dataset(boxes="synthesizer"), steps=2, batch_size=4, progress=False,
                   log_fn=logs.append, log_every=1)
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(v)) for r in logs for k, v in r.items() if k != "step")
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))

    # the store as the source of dfkd-distill task=detection (synthesizer=stored)
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dfkd.cli.common import config_dir
    from dfkd.config import register_configs
    from dfkd.pipeline import run_distill

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="distill", overrides=[
            "task=detection", "teacher=detector", f"teacher.checkpoint={teacher_file}", "data.name=none",
            "synthesizer=stored", f"synthesizer.path={written[0]}", "synthesizer.batch_size=4", "detection.steps=4",
            "detection.kd_steps=2", "detection.batch_size=4", "detection.memory_size=8", "progress=false",
            "threads=1", "device=cpu"])
    s = run_distill(cfg, tmp_path / "run")
    assert s["synthesizer"] == "stored" and s["steps"] == 4 and s["images_synthesized"] == 8


def test_stored_detection_dataset_needs_a_detection_teacher(written, bn_teacher):
    from generators.stored import StoredSynthesizer

    with pytest.raises(DfkdError, match="holds detection data, the teacher given is a classifier"):
        StoredSynthesizer(bn_teacher, path=str(written[0]))
    with pytest.raises(DfkdError, match="task=detection"):
        StoredSynthesizer(None, path=str(written[0]))


def test_bad_detection_input_is_one_line_exit_2(teacher_file, tmp_path, capsys):
    out = tmp_path / "bad"
    cases = [
        ("deepinversion", [], "makes classification data, but task=detection"),
        ("box_real", [], "detection.train_path"),
        ("stored", [f"synthesizer.path={tmp_path}"], "synthesizer=stored only reads one"),
        ("box_inversion", [f"teacher.checkpoint={tmp_path / 'missing.safetensors'}"], "detector checkpoint not found"),
        ("box_inversion", ["teacher.checkpoint=null"], "task=detection needs a detector"),
    ]
    for synthesizer, extra, needle in cases:
        code, _, err = synthesize(*det_args(teacher_file, out, synthesizer), *extra, capsys=capsys)
        err = err.strip()
        assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, (extra, err)
        assert err.startswith("dfkd-synthesize: error:") and needle in err, (extra, err)
        assert not (out / "shards").exists(), extra  # nothing written before the check
    # and a detection synthesizer in a classification run
    code, _, err = synthesize(f"teacher.checkpoint={teacher_file}", "synthesizer=box_inversion", f"output={out}",
                              "threads=1", "progress=false", capsys=capsys)
    assert code == 2 and "makes detection data, but task=classification" in err, err
