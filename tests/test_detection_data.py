"""Detection data (COCO/YOLO loading, canvas builder) and the COCO mAP evaluator."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shared_data
from dfkd.data.detection import (DetectionDataset, _render_background, _render_object, build_canvas_benchmark,
                                 build_canvases, collate_detection, load_detection)
from dfkd.errors import DfkdError
from dfkd.eval.detection import coco_map, evaluate_detector, predictions_to_coco

DATA = shared_data()
COCO128 = DATA / "detection" / "coco128" if DATA else None


# -- canvas builder -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("canvases")
    a = build_canvas_benchmark("digits", root / "a", train_canvases=30, test_canvases=20, seed=3)
    b = build_canvas_benchmark("digits", root / "b", train_canvases=30, test_canvases=20, seed=3)
    return a, b


def _png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_canvas_builder_is_deterministic(digits_sets):
    a, b = digits_sets
    for split in ("train", "test"):
        assert a[split].read_bytes() == b[split].read_bytes()
        files_a = sorted((a[split].parent / "images").iterdir())
        files_b = sorted((b[split].parent / "images").iterdir())
        assert [f.name for f in files_a] == [f.name for f in files_b] and len(files_a) == (30 if split == "train" else 20)
        assert all(fa.read_bytes() == fb.read_bytes() for fa, fb in zip(files_a, files_b))
    # another seed, other canvases
    root = a["train"].parent.parent
    images, labels = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8), [0, 1, 0, 1, 0, 1]
    p3 = build_canvases(images, labels, ["x", "y"], root / "s3", 2, canvas_size=16, seed=3)
    p4 = build_canvases(images, labels, ["x", "y"], root / "s4", 2, canvas_size=16, seed=4)
    assert p3.read_bytes() != p4.read_bytes()


def test_canvas_boxes_hold_their_objects_and_test_uses_test_split(digits_sets):
    from dfkd.data import load_digits

    spec = load_digits(train=True)
    for split, ds in (("train", spec.train), ("test", spec.test)):
        src = (ds.images.permute(0, 2, 3, 1).repeat(1, 1, 1, 3).numpy() * 255).round().astype(np.uint8)
        data = json.loads(digits_sets[0][split].read_text())
        info = data["info"]["dfkd_canvases"]
        assert info["source"] == {"dataset": "digits", "split": split} and info["num_sources"] == len(ds)
        assert info["canvas_size"] == 48 and info["object_pixels"] == [12, 24]
        assert [c["id"] for c in data["categories"]] == list(range(1, 11))
        by_image = {im["id"]: [] for im in data["images"]}
        for a in data["annotations"]:
            by_image[a["image_id"]].append(a)
        assert sum(map(len, by_image.values())) > len(data["images"])  # several objects on some canvases
        for im in data["images"]:
            canvas = _png(digits_sets[0][split].parent / "images" / im["file_name"])
            assert canvas.shape == (48, 48, 3)
            # the canvas is exactly: the background made from one image of this split, then each
            # object (an image of this split, resized to its box) pasted in annotation order
            expected = _render_background(src[im["background_index"]], 48, "image").copy()
            anns = by_image[im["id"]]
            assert 1 <= len(anns) <= 3
            assert im["background_index"] not in [a["source_index"] for a in anns]
            for a in anns:
                x, y, w, h = a["bbox"]
                assert 0 <= x and 0 <= y and x + w <= 48 and y + h <= 48 and 12 <= min(w, h) <= max(w, h) <= 24
                assert a["area"] == w * h and a["iscrowd"] == 0
                j = a["source_index"]
                assert 0 <= j < len(ds) and a["category_id"] == int(ds.labels[j]) + 1
                obj = _render_object(src[j], w, h)
                assert not np.array_equal(obj, expected[y:y + h, x:x + w])  # the object is visible there
                expected[y:y + h, x:x + w] = obj
                # independent of the builder's helpers: the box, shrunk back to 8×8, is (among the
                # 1 % closest to) its source digit, even where a later object covers a corner of it
                crop = np.asarray(Image.fromarray(canvas[y:y + h, x:x + w]).resize((8, 8), Image.BILINEAR), np.float64)
                dist = np.abs(src.astype(np.float64) - crop).mean(axis=(1, 2, 3))
                assert (dist < dist[j]).sum() < 0.01 * len(dist)
            np.testing.assert_array_equal(canvas, expected)


def test_canvas_set_loads_and_rebuilds_only_when_needed(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 10, 10, 3), dtype=np.uint8)  # NHWC
    labels = np.arange(12) % 3
    out = tmp_path / "set"
    p = build_canvases(images, labels, ["a", "b", "c"], out, 6, canvas_size=32, background="gray", seed=1)
    stamp = p.stat().st_mtime_ns
    assert build_canvases(images, labels, ["a", "b", "c"], out, 6, canvas_size=32, background="gray", seed=1) == p
    assert p.stat().st_mtime_ns == stamp  # same parameters: returned as it is
    # the same images as NCHW tensors are the same sources
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2)
    assert build_canvases(nchw, torch.from_numpy(labels), ["a", "b", "c"], out, 6, canvas_size=32,
                          background="gray", seed=1) == p and p.stat().st_mtime_ns == stamp
    with pytest.raises(DfkdError, match="another canvas set"):
        build_canvases(images, labels, ["a", "b", "c"], out, 4, canvas_size=32, background="gray", seed=1)

    ds = load_detection(out)
    assert len(ds) == 6 and ds.classes == ["a", "b", "c"] and ds.category_ids == [1, 2, 3]
    img, t = ds[0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    data = json.loads(p.read_text())
    for i in range(len(ds)):
        img, t = ds[i]
        mask = torch.ones(32, 32, dtype=torch.bool)
        for (x1, y1, x2, y2), lab in zip(t["boxes"].long().tolist(), t["labels"].tolist()):
            mask[y1:y2, x1:x2] = False
        assert torch.all(img[:, mask] == 128 / 255)  # gray everywhere outside the boxes
    for a in data["annotations"]:
        assert a["category_id"] == labels[a["source_index"]] + 1
    images_batch, targets = collate_detection([ds[0], ds[1]])
    assert len(images_batch) == 2 and targets[1]["image_id"] == ds.image_ids[1]

    # an interrupted build (no json) is redone, identically
    before = {f.name: f.read_bytes() for f in (out / "images").iterdir()}
    p.unlink()
    build_canvases(images, labels, ["a", "b", "c"], out, 6, canvas_size=32, background="gray", seed=1)
    assert {f.name: f.read_bytes() for f in (out / "images").iterdir()} == before
    # overwrite with fewer canvases leaves no stale images
    build_canvases(images, labels, ["a", "b", "c"], out, 4, canvas_size=32, background="gray", seed=1, overwrite=True)
    assert len(list((out / "images").iterdir())) == 4 and len(load_detection(out)) == 4


# -- COCO mAP, checked by hand ------------------------------------------------------------
def _gt():
    from pycocotools.coco import COCO

    gt = COCO()
    gt.dataset = {
        "images": [{"id": 1, "width": 100, "height": 100, "file_name": "1.png"},
                   {"id": 2, "width": 100, "height": 100, "file_name": "2.png"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 30, 30], "area": 900, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [5, 5, 40, 40], "area": 1600, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def _det(image_id, cat, bbox, score):
    return {"image_id": image_id, "category_id": cat, "bbox": bbox, "score": score}


PERFECT = [_det(1, 1, [10, 10, 20, 20], 0.9), _det(1, 2, [50, 50, 30, 30], 0.8), _det(2, 1, [5, 5, 40, 40], 0.7)]


def test_coco_map_perfect_and_partial_iou():
    r = coco_map(_gt(), PERFECT)
    assert r["map"] == pytest.approx(1.0) and r["map50"] == pytest.approx(1.0) and r["map75"] == pytest.approx(1.0)
    assert r["per_class"] == pytest.approx({"a": 1.0, "b": 1.0})
    assert r["num_images"] == 2 and r["num_detections"] == 3

    # class b's only detection has the GT's x-extent and 17.4 of its 30 rows: IoU = 17.4/30 = 0.58.
    # It is a true positive at IoU thresholds 0.50 and 0.55 (precision 1 at every recall point → AP 1)
    # and a false positive at 0.60 ... 0.95 (AP 0): AP_b@[.5:.95] = 2/10 = 0.2, AP_b@.5 = 1, AP_b@.75 = 0.
    dets = PERFECT[:1] + [_det(1, 2, [50, 50, 30, 17.4], 0.8)] + PERFECT[2:]
    r = coco_map(_gt(), dets, class_names=["A", "B"])
    assert r["per_class"] == pytest.approx({"A": 1.0, "B": 0.2})
    assert r["map"] == pytest.approx((1.0 + 0.2) / 2)
    assert r["map50"] == pytest.approx(1.0)
    assert r["map75"] == pytest.approx((1.0 + 0.0) / 2)


def test_coco_map_false_positive_ranked_above_a_true_positive():
    # Class a has 2 GT boxes. Detections by score: TP (0.9), FP (0.8, on an empty part of image 2),
    # TP (0.7): recall 0.5, 0.5, 1; precision 1, 1/2, 2/3. COCO makes precision monotone from the
    # right (1, 2/3, 2/3) and reads it at the 101 recall points 0, 0.01, ..., 1 (first detection with
    # recall >= r): r <= 0.5 (51 points) → 1, r > 0.5 (50 points) → 2/3. AP_a = (51 + 50·2/3)/101
    # at every IoU threshold (the true positives are exact); class b stays perfect.
    ap_a = (51 + 50 * 2 / 3) / 101
    dets = [_det(1, 1, [10, 10, 20, 20], 0.9), _det(2, 1, [60, 60, 20, 20], 0.8), _det(2, 1, [5, 5, 40, 40], 0.7),
            _det(1, 2, [50, 50, 30, 30], 0.8)]
    r = coco_map(_gt(), dets)
    assert r["per_class"]["a"] == pytest.approx(ap_a) and r["per_class"]["b"] == pytest.approx(1.0)
    assert r["map"] == pytest.approx((ap_a + 1) / 2) and r["map50"] == pytest.approx((ap_a + 1) / 2)

    # the false positive above both true positives: precision 0, 1/2, 2/3 → monotone 2/3 everywhere → AP 2/3
    dets[1] = _det(2, 1, [60, 60, 20, 20], 0.95)
    assert coco_map(_gt(), dets)["per_class"]["a"] == pytest.approx(2 / 3)


def test_coco_map_no_detections_and_bad_detections():
    r = coco_map(_gt(), [])
    assert r == {"map": 0.0, "map50": 0.0, "map75": 0.0, "per_class": {"a": 0.0, "b": 0.0},
                 "num_images": 2, "num_detections": 0}
    # only image 2 evaluated: class b has no ground truth there
    r = coco_map(_gt(), PERFECT, image_ids=[2])
    assert r["per_class"] == pytest.approx({"a": 1.0}) and r["num_images"] == 1 and r["num_detections"] == 1
    with pytest.raises(ValueError, match="category_id 0"):
        coco_map(_gt(), [_det(1, 0, [10, 10, 20, 20], 0.9)])
    with pytest.raises(ValueError, match="image 7"):
        coco_map(_gt(), [_det(7, 1, [10, 10, 20, 20], 0.9)])


def test_predictions_to_coco():
    out = [{"boxes": torch.tensor([[10.0, 10, 30, 30], [50, 50, 80, 80]]), "scores": torch.tensor([0.9, 0.8]),
            "labels": torch.tensor([0, 1])},
           {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}]
    dets = predictions_to_coco(out, [1, 2], category_ids=[1, 2])
    assert dets == [_det(1, 1, [10.0, 10.0, 20.0, 20.0], pytest.approx(0.9)),
                    _det(1, 2, [50.0, 50.0, 30.0, 30.0], pytest.approx(0.8))]
    with pytest.raises(ValueError, match="labels"):
        predictions_to_coco(out, [1, 2], category_ids=[1])


class Oracle(torch.nn.Module):
    """Answers with a dataset's ground truth (score 1), image by image in order."""

    def __init__(self, dataset, empty=False):
        super().__init__()
        self.dataset, self.empty, self.next = dataset, empty, 0
        self.layer = torch.nn.Linear(1, 1)

    def forward(self, images):
        assert not self.training and not torch.is_grad_enabled()
        out = []
        for img in images:
            t = self.dataset.get_target(self.next)
            assert img.shape[0] == 3
            self.next += 1
            keep = slice(0, 0) if self.empty else slice(None)
            out.append({"boxes": t["boxes"][keep], "labels": t["labels"][keep],
                        "scores": torch.ones(len(t["labels"]))[keep]})
        return out


def test_evaluate_detector_with_an_oracle(digits_sets):
    ds = load_detection(digits_sets[0]["test"].parent)
    model = Oracle(ds).train()
    r = evaluate_detector(model, ds, batch_size=4, max_images=10)
    assert model.training and r["num_images"] == 10 and r["map"] == pytest.approx(1.0)
    assert set(r["per_class"]) <= set(ds.classes)
    r = evaluate_detector(Oracle(ds, empty=True).eval(), ds, batch_size=8)
    assert r["map"] == 0.0 and r["num_images"] == len(ds) and r["num_detections"] == 0


# -- COCO json and YOLO folders -----------------------------------------------------------
def _write_image(path, size, mode="RGB", value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 50, 200)).save(path)


def test_yolo_folder_round_trip(tmp_path):
    root = tmp_path / "yolo"
    _write_image(root / "images" / "train" / "img1.png", (40, 30), mode="L")
    _write_image(root / "images" / "train" / "img2.jpg", (50, 50))
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "train" / "img1.txt").write_text("1 0.5 0.5 0.5 0.4\n0 0.25 0.25 0.1 0.1\n")
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nnames:\n  0: cat\n  1: dog\n")
    ds = load_detection(root)
    assert ds.classes == ["cat", "dog"] and ds.category_ids == [1, 2] and ds.image_ids == [1, 2] and ds.num_classes == 2
    img, t = ds[0]
    assert img.shape == (3, 30, 40) and torch.equal(img[0], img[2]) and img.max() == pytest.approx(100 / 255)
    torch.testing.assert_close(t["boxes"], torch.tensor([[10.0, 9, 30, 21], [8, 6, 12, 9]]))
    assert t["labels"].tolist() == [1, 0] and t["labels"].dtype == torch.int64 and t["image_id"] == 1
    img, t = ds[1]  # no label file: no objects
    assert img.shape == (3, 50, 50) and t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)
    gt = ds.coco()
    assert len(gt.getAnnIds()) == 2 and gt.loadAnns(gt.getAnnIds(imgIds=[1], catIds=[2]))[0]["bbox"] == \
        pytest.approx([10, 9, 20, 12])

    (root / "data.yaml").write_text("names: [cat, dog]\n")  # names as a list
    _write_image(root / "images" / "val" / "000000000042.png", (20, 20))
    with pytest.raises(DfkdError, match="several splits"):
        load_detection(root)
    assert len(load_detection(root, split="train")) == 2
    val = load_detection(root, split="val")
    assert val.image_ids == [42] and val[0][1]["boxes"].shape == (0, 4)
    with pytest.raises(DfkdError, match="no split 'test'"):
        load_detection(root, split="test")

    (root / "labels" / "train" / "img1.txt").write_text("1 0.5 0.5\n")
    with pytest.raises(DfkdError, match=r"img1\.txt:1"):
        load_detection(root, split="train")
    (root / "labels" / "train" / "img1.txt").write_text("5 0.5 0.5 0.1 0.1\n")
    with pytest.raises(DfkdError, match="class 5"):
        load_detection(root, split="train")
    (root / "data.yaml").unlink()
    with pytest.raises(DfkdError, match="names"):
        load_detection(root, split="train")


def test_coco_json_round_trip(tmp_path):
    root = tmp_path / "coco"
    _write_image(root / "images" / "a.png", (20, 10))
    _write_image(root / "images" / "b.png", (16, 16), mode="L")
    coco = {"images": [{"id": 5, "file_name": "a.png", "width": 20, "height": 10}, {"id": 9, "file_name": "b.png"}],
            "annotations": [{"id": 1, "image_id": 5, "category_id": 7, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0},
                            {"id": 2, "image_id": 5, "category_id": 3, "bbox": [0, 0, 10, 10], "area": 100,
                             "iscrowd": 1},
                            {"id": 3, "image_id": 5, "category_id": 3, "bbox": [15, 5, 10, 10]}],  # runs off the image
            "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}]}
    (root / "annotations.json").write_text(json.dumps(coco))
    for ds in (load_detection(root / "annotations.json"), load_detection(root)):
        assert ds.classes == ["three", "seven"] and ds.category_ids == [3, 7] and ds.image_ids == [5, 9]
        img, t = ds[0]
        assert img.shape == (3, 10, 20) and t["image_id"] == 5
        # the crowd box is left out of the target; the last box is clipped to the image
        torch.testing.assert_close(t["boxes"], torch.tensor([[1.0, 1, 6, 6], [15, 5, 20, 10]]))
        assert t["labels"].tolist() == [1, 0]
        img, t = ds[1]
        assert img.shape == (3, 16, 16) and t["boxes"].shape == (0, 4) and t["boxes"].dtype == torch.float32
        gt = ds.coco()
        assert len(gt.getAnnIds()) == 3 and gt.imgs[9]["width"] == 16
    # the targets as detections score 1.0; class "three" has only a crowd box, so no AP
    coco["annotations"] = coco["annotations"][:2]  # without the box that runs off the image
    (root / "annotations.json").write_text(json.dumps(coco))
    ds = load_detection(root)
    outs = [{**ds.get_target(i), "scores": torch.ones(len(ds.get_target(i)["labels"]))} for i in range(len(ds))]
    r = coco_map(ds.coco(), predictions_to_coco(outs, ds.image_ids, ds.category_ids))
    assert r["map"] == pytest.approx(1.0) and r["per_class"] == pytest.approx({"seven": 1.0})
    assert r["num_detections"] == 1


def test_bad_paths_are_one_line_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DfkdError, match="not found: .*nowhere"):
        load_detection(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DfkdError, match="unknown detection format"):
        load_detection(tmp_path / "empty")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DfkdError, match="unknown detection format"):
        load_detection(tmp_path / "x.txt")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DfkdError, match="cannot read COCO json .*bad.json"):
        load_detection(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(DfkdError, match="not a COCO detection json"):
        load_detection(tmp_path / "list.json")
    (tmp_path / "lost.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "gone.png"}],
                                                    "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    with pytest.raises(DfkdError, match="gone.png"):
        load_detection(tmp_path / "lost.json")
    with pytest.raises(DfkdError, match="unknown canvas source"):
        build_canvas_benchmark("mnist", tmp_path / "c")


def test_build_script(tmp_path):
    from conftest import ROOT, run_forked  # each run a process of its own, forked from the command server

    script = ROOT / "scripts" / "build_detection_set.py"
    ok = run_forked("--source", "digits", "--out", tmp_path / "set", "--train", "4", "--test", "3",
                    "--canvas-size", "32", script=script, timeout=120)
    assert ok.returncode == 0, ok.stderr
    paths = ok.stdout.split()
    assert paths == [str(tmp_path / "set" / s / "annotations.json") for s in ("train", "test")]
    assert len(load_detection(tmp_path / "set" / "test")) == 3
    bad = run_forked("--source", "cifar10", "--out", tmp_path / "c", "--root", tmp_path / "nope", script=script,
                     timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "build_detection_set: error:" in bad.stderr


# -- real data ----------------------------------------------------------------------------
needs_coco128 = pytest.mark.skipif(
    COCO128 is None or not (COCO128 / "labels").is_dir(),
    reason="set DFKD_DATA to the folder holding detection/coco128 to run this test",
)


@needs_coco128
def test_coco128_loads_and_its_ground_truth_scores_one():
    ds = load_detection(COCO128)
    assert isinstance(ds, DetectionDataset)
    assert len(ds) == 128 and ds.num_boxes == 929 and ds.num_classes == 80 and ds.classes[0] == "person"
    gt = ds.coco()
    assert len(gt.getAnnIds()) == 929
    assert len({a["category_id"] for a in gt.dataset["annotations"]}) == 71
    assert 9 in ds.image_ids  # COCO file names keep their image ids
    gray = [i for i in range(len(ds)) if Image.open(ds.image_path(i)).mode == "L"]
    assert gray
    img, t = ds[gray[0]]
    assert img.shape[0] == 3 and torch.equal(img[0], img[1]) and 0 <= img.min() and img.max() <= 1
    # the ground truth itself as detections, end to end through the detector loop and predictions_to_coco
    r = evaluate_detector(Oracle(ds), ds, batch_size=32)
    assert r["num_images"] == 128 and r["num_detections"] == 929
    assert r["map"] >= 0.99 and r["map50"] >= 0.99 and len(r["per_class"]) == 71


@pytest.mark.skipif(DATA is None or not (DATA / "cifar10" / "cifar10_test.npz").is_file(),
                    reason="set DFKD_DATA to the folder holding cifar10/ to run this test")
def test_cifar10_canvases_come_from_their_split(tmp_path):
    from dfkd.data import load_cifar10

    out = build_canvas_benchmark("cifar10", tmp_path, root=DATA, train_canvases=4, test_canvases=6)
    test = load_cifar10(DATA, train=False).test
    src = test.images.permute(0, 2, 3, 1).numpy()
    data = json.loads(out["test"].read_text())
    assert data["info"]["dfkd_canvases"]["num_sources"] == len(test) == 10000
    for im in data["images"]:
        canvas = _png(out["test"].parent / "images" / im["file_name"])
        expected = _render_background(src[im["background_index"]], 64, "image").copy()
        for a in (a for a in data["annotations"] if a["image_id"] == im["id"]):
            x, y, w, h = a["bbox"]
            expected[y:y + h, x:x + w] = _render_object(src[a["source_index"]], w, h)
            assert a["category_id"] == int(test.labels[a["source_index"]]) + 1
        np.testing.assert_array_equal(canvas, expected)
