"""YOLO detectors: safe loading, the rebuilt network, decode/letterbox/NMS, the teacher interface.

Tiny random YOLOs built from small architecture dicts (seconds on a CPU); the shared YOLOv5n when
``DFKD_DATA`` is set.
"""

from __future__ import annotations

import copy
import pickle
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import shared_data
from dfkd.detection import yolo_blocks as B
from dfkd.detection.safe_pickle import Stub, load_inert
from dfkd.detection.yolo import (YOLODetector, YOLOModel, letterbox, load_yolo, nms, read_yolo_checkpoint,
                                 yolo_name_allowed)
from dfkd.errors import DfkdError

pytestmark = pytest.mark.usefixtures("one_thread")

ANCHORS = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]
# a YOLOv5-layout network at width 1/8 (strides 8/16/32, PANet head), small enough for 64-px tests
TINY_V5 = {
    "nc": 3, "depth_multiple": 0.33, "width_multiple": 0.125, "anchors": ANCHORS,
    "backbone": [[-1, 1, "Conv", [64, 6, 2, 2]], [-1, 1, "Conv", [128, 3, 2]], [-1, 3, "C3", [128]],
                 [-1, 1, "Conv", [256, 3, 2]], [-1, 2, "C3", [256]], [-1, 1, "Conv", [512, 3, 2]],
                 [-1, 1, "C3", [512]], [-1, 1, "Conv", [1024, 3, 2]], [-1, 1, "C3", [1024]],
                 [-1, 1, "SPPF", [1024, 5]]],
    "head": [[-1, 1, "Conv", [512, 1, 1]], [-1, 1, "nn.Upsample", ["None", 2, "nearest"]],
             [[-1, 6], 1, "Concat", [1]], [-1, 1, "C3", [512, False]], [-1, 1, "Conv", [256, 1, 1]],
             [-1, 1, "nn.Upsample", ["None", 2, "nearest"]], [[-1, 4], 1, "Concat", [1]],
             [-1, 1, "C3", [256, False]], [-1, 1, "Conv", [256, 3, 2]], [[-1, 14], 1, "Concat", [1]],
             [-1, 1, "C3", [512, False]], [-1, 1, "Conv", [512, 3, 2]], [[-1, 10], 1, "Concat", [1]],
             [-1, 1, "C3", [1024, False]], [[17, 20, 23], 1, "Detect", ["nc", "anchors"]]],
}
TINY_V8 = {
    "nc": 2, "scale": "t", "scales": {"t": [0.33, 0.125, 256]},
    "backbone": [[-1, 1, "Conv", [64, 3, 2]], [-1, 1, "Conv", [128, 3, 2]], [-1, 1, "C2f", [128, True]],
                 [-1, 1, "Conv", [256, 3, 2]], [-1, 2, "C2f", [256, True]], [-1, 1, "Conv", [512, 3, 2]],
                 [-1, 1, "C2f", [512, True]], [-1, 1, "Conv", [1024, 3, 2]], [-1, 1, "SPPF", [1024, 5]]],
    "head": [[-1, 1, "nn.Upsample", [None, 2, "nearest"]], [[-1, 6], 1, "Concat", [1]], [-1, 1, "C2f", [512]],
             [-1, 1, "nn.Upsample", [None, 2, "nearest"]], [[-1, 4], 1, "Concat", [1]], [-1, 1, "C2f", [256]],
             [[14, 11, 8], 1, "Detect", ["nc"]]],
}


def tiny_v5(seed: int = 0) -> YOLOModel:
    torch.manual_seed(seed)
    m = YOLOModel(TINY_V5)
    for bn in m.modules():  # non-trivial running statistics, so a wrong BatchNorm mapping shows
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


# -- a checkpoint in the layout of the original package, written without that package ----------
ORIGINAL_NAMES = {B.Conv: "models.common.Conv", B.C3: "models.common.C3", B.Bottleneck: "models.common.Bottleneck",
                  B.SPPF: "models.common.SPPF", B.Concat: "models.common.Concat", B.Detect: "models.yolo.Detect",
                  YOLOModel: "models.yolo.Model"}


V8_NAMES = {B.Conv: "ultralytics.nn.modules.conv.Conv", B.Concat: "ultralytics.nn.modules.conv.Concat",
            B.C2f: "ultralytics.nn.modules.block.C2f", B.Bottleneck: "ultralytics.nn.modules.block.Bottleneck",
            B.SPPF: "ultralytics.nn.modules.block.SPPF", B.DFL: "ultralytics.nn.modules.block.DFL",
            B.DetectV8: "ultralytics.nn.modules.head.Detect", YOLOModel: "ultralytics.nn.tasks.DetectionModel"}


def _original_package(names=None):
    """Stand-ins for the original package's modules and classes (only ever used for writing)."""
    names = ORIGINAL_NAMES if names is None else names
    mods, classes = {}, {}
    for cls, full in names.items():
        parts = full.split(".")
        for k in range(1, len(parts)):
            mods.setdefault(".".join(parts[:k]), types.ModuleType(".".join(parts[:k])))
        mod, name = full.rsplit(".", 1)
        classes[cls] = type(name, (cls,), {"__module__": mod, "__qualname__": name})
        setattr(mods[mod], name, classes[cls])
    return mods, classes


def as_original(model: YOLOModel, classes, half: bool = True, cfg=None) -> nn.Module:
    """A copy of ``model`` shaped as YOLOv5's training code pickles its models: classes
    ``models.common.*`` / ``models.yolo.*``, the description in ``.yaml``, names, stride, fp16."""
    m = copy.deepcopy(model)
    for sub in m.modules():
        if type(sub) in classes:
            sub.__class__ = classes[type(sub)]
    m.yaml = copy.deepcopy(cfg if cfg is not None else model.cfg)
    m.names = [f"class{i}" for i in range(model.num_classes)]
    m.stride = torch.tensor(model.strides)
    return m.half() if half else m


def save_original_style(path: Path, monkeypatch, names=None, **entries) -> None:
    """``torch.save`` of ``{"epoch", ..., **entries}`` with the stand-in package in ``sys.modules``
    only while saving; ``entries`` values are YOLOModels (converted) or plain values."""
    mods, classes = _original_package(names)
    ck = {"epoch": -1, "best_fitness": None, "model": None, "ema": None, "optimizer": None, "date": "2022-02-22"}
    for k, v in entries.items():
        if isinstance(v, tuple):  # (model, options)
            v = as_original(v[0], classes, **v[1])
        elif isinstance(v, YOLOModel):
            v = as_original(v, classes)
        ck[k] = v
    with monkeypatch.context() as mp:
        for n, mod in mods.items():
            mp.setitem(sys.modules, n, mod)
        torch.save(ck, path)
    assert not any(n in sys.modules for n in mods)


def write_original_style(model: YOLOModel, path: Path, monkeypatch, half: bool = True, cfg=None) -> None:
    save_original_style(path, monkeypatch, model=(model, {"half": half, "cfg": cfg}))


@pytest.fixture()
def tiny_ckpt(tmp_path, monkeypatch):
    model = tiny_v5()
    path = tmp_path / "tiny.pt"
    write_original_style(model, path, monkeypatch, half=False)
    return model, path


# -- the network -----------------------------------------------------------------------------
def test_tiny_v5_shapes_strides_and_anchor_decode():
    m = tiny_v5()
    assert m.version == 5 and m.strides == [8.0, 16.0, 32.0]
    assert torch.allclose(m.anchors_px, torch.tensor(ANCHORS, dtype=torch.float32).view(3, 3, 2))
    x = torch.rand(2, 3, 64, 96)
    raw = m(x)
    assert [tuple(r.shape) for r in raw] == [(2, 3, 8, 12, 8), (2, 3, 4, 6, 8), (2, 3, 2, 3, 8)]
    dec = m.decode(raw)
    assert dec.shape == (2, 3 * (96 + 24 + 6), 4 + 3)
    # zero logits: sigmoid 0.5, so xy = (grid + 0.5)·stride, wh = anchor, confidence 0.25
    zero = m.decode([torch.zeros_like(r) for r in raw])
    assert torch.allclose(zero[0, 0], torch.tensor([4.0, 4.0, 10.0, 13.0, 0.25, 0.25, 0.25]))
    last = zero[0, 3 * 96 + 3 * 24 - 1]  # level 2, last anchor, last cell (row 3, column 5)
    assert torch.allclose(last[:4], torch.tensor([5.5 * 16, 3.5 * 16, 59.0, 119.0]))
    # a logit of +inf on x moves the centre 1.5 cells: (2·1 − 0.5 + grid)·stride
    pushed = [torch.zeros_like(r) for r in raw]
    pushed[0][..., 0] = 30.0
    assert torch.allclose(m.decode(pushed)[0, 0, :2], torch.tensor([12.0, 4.0]))


def test_block_widths_follow_the_multiples():
    m = tiny_v5()
    assert m.model[0].conv.weight.shape == (8, 3, 6, 6)  # 64 · 1/8, 6×6 stride-2 stem
    assert len(m.model[2].m) == 1 and len(m.model[4].m) == 1  # 3 · 0.33 → 1, 2 · 0.33 → 1
    assert isinstance(m.model[9], B.SPPF) and m.model[-1].m[0].out_channels == 3 * 8
    assert m.save == [4, 6, 10, 14, 17, 20, 23]


def test_tiny_v8_shapes_and_decode():
    torch.manual_seed(0)
    m = YOLOModel(TINY_V8).eval()
    assert m.version == 8 and m.strides == [8.0, 16.0, 32.0]
    raw = m(torch.rand(1, 3, 64, 64))
    assert [tuple(r.shape) for r in raw] == [(1, 64 + 2, 8, 8), (1, 66, 4, 4), (1, 66, 2, 2)]
    dec = m.decode(raw)
    assert dec.shape == (1, 64 + 16 + 4, 6)
    # equal bins: every distance is the mean bin 7.5, so boxes are 15 strides wide around the cell centre
    flat = m.decode([torch.zeros_like(r) for r in raw])
    assert torch.allclose(flat[0, 0, :4], torch.tensor([4.0, 4.0, 120.0, 120.0]))
    assert torch.allclose(flat[0, :, 4:], torch.full((84, 2), 0.5))


def test_bad_descriptions_give_one_line_errors():
    bad = copy.deepcopy(TINY_V5)
    bad["head"][2][2] = "Concatenate"
    with pytest.raises(DfkdError, match="unknown module 'Concatenate'.*Concat"):
        YOLOModel(bad)
    bad = copy.deepcopy(TINY_V5)
    bad["head"][2][0] = [-1, 40]
    with pytest.raises(DfkdError, match="no earlier layer"):
        YOLOModel(bad)
    with pytest.raises(DfkdError, match="backbone"):
        YOLOModel({"nc": 3})


# -- pre- and post-processing ------------------------------------------------------------------
def test_letterbox_resizes_pads_grey_and_centres():
    img = torch.rand(3, 30, 50)
    out, r, (left, top) = letterbox(img, size=64)
    assert out.shape == (3, 64, 64) and r == pytest.approx(64 / 50)
    assert (left, top) == (0, 13)  # 64 - round(30·1.28) = 26 rows, 13 on each side
    assert torch.all(out[:, :13] == 114 / 255) and torch.all(out[:, 13 + 38:] == 114 / 255)
    auto, _, (_, top_a) = letterbox(img, size=64, stride=32, auto=True)
    assert auto.shape == (3, 64, 64) and top_a == 13  # 38 rows → 64, the next multiple of 32
    small, r2, _ = letterbox(torch.rand(3, 16, 16), size=64, scaleup=False)
    assert r2 == 1.0 and small.shape == (3, 64, 64)


def test_nms_keeps_the_best_box_per_class_and_every_class_above_threshold():
    #           cx  cy  w   h   class0 class1
    d = torch.tensor([[[20, 20, 10, 10, 0.9, 0.02],
                       [21, 20, 10, 10, 0.8, 0.30],
                       [60, 60, 10, 10, 0.0005, 0.0]]])
    out = nms(d, conf_thres=0.001, iou_thres=0.6)[0]
    got = sorted(zip(out["labels"].tolist(), [round(s, 3) for s in out["scores"].tolist()]))
    # box 1 is kept for both classes above 0.001; the two class-1 candidates overlap (IoU 0.82), so
    # only the 0.30 one survives; box 2 (0.0005) is below the threshold
    assert got == [(0, 0.9), (1, 0.3)]
    assert torch.allclose(out["boxes"][out["labels"] == 0], torch.tensor([[15.0, 15.0, 25.0, 25.0]]))
    single = nms(d, conf_thres=0.001, iou_thres=0.6, multi_label=False)[0]
    assert sorted(single["labels"].tolist()) == [0]


def test_forward_maps_boxes_back_to_the_original_pixels():
    det = YOLODetector(tiny_v5(), image_size=64, conf_thres=0.0, max_det=5)
    img = torch.rand(3, 30, 50)
    out = det([img])[0]
    x, r, (left, top) = letterbox(img, 64, 32)
    ref = det.detect(x[None], conf_thres=0.0, max_det=5)[0]["boxes"]
    expect = ref.clone()
    expect[:, 0::2] = ((expect[:, 0::2] - left) / r).clamp(0, 50)
    expect[:, 1::2] = ((expect[:, 1::2] - top) / r).clamp(0, 30)
    assert out["boxes"].shape == (5, 4) and torch.allclose(out["boxes"], expect)
    assert (out["boxes"][:, 2] <= 50).all() and (out["boxes"][:, 3] <= 30).all()


# -- teacher interface -----------------------------------------------------------------------------
def test_head_outputs_reach_the_pixels_and_restore_modes():
    det = YOLODetector(tiny_v5(), image_size=64)
    det.train()
    det.model.model[3].eval()  # a mixed state must come back exactly
    before = {n: m.training for n, m in det.named_modules()}
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    raw = det.head_outputs(x)
    assert all(r.requires_grad for r in raw)
    decoded = det.decode(raw)
    decoded[..., 4:].max(-1).values.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert {n: m.training for n, m in det.named_modules()} == before
    # BatchNorm ran in eval mode: running statistics untouched
    bn = det.batchnorm_layers()[0]
    mean = bn.running_mean.clone()
    det.head_outputs(torch.rand(2, 3, 64, 64))
    assert torch.equal(bn.running_mean, mean)


def test_modes_restored_when_the_forward_fails(monkeypatch):
    det = YOLODetector(tiny_v5(), image_size=64).train()

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(det.model.model[5], "forward", boom)
    with pytest.raises(RuntimeError, match="boom"):
        det.head_outputs(torch.rand(1, 3, 64, 64))
    assert all(m.training for m in det.modules())
    with pytest.raises(DfkdError, match="multiple of the stride 32"):
        det.head_outputs(torch.rand(1, 3, 48, 64))


def test_batchnorm_prior_on_the_detector():
    det = YOLODetector(tiny_v5(), image_size=64)
    assert len(det.batchnorm_layers()) == sum(isinstance(m, nn.BatchNorm2d) for m in det.modules()) > 20
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    with det.statistics("batchnorm") as prior:
        det.head_outputs(x)
        loss = prior.loss()
    loss.backward()
    assert torch.isfinite(loss) and x.grad.abs().sum() > 0
    assert all(not m._forward_hooks for m in det.modules())


# -- safe loading --------------------------------------------------------------------------------
def test_original_style_checkpoint_loads_strictly_and_reproduces_the_outputs(tiny_ckpt):
    model, path = tiny_ckpt
    det = load_yolo(path, image_size=64)
    assert "models" not in sys.modules and "models.common" not in sys.modules  # nothing was imported
    assert det.class_names == ["class0", "class1", "class2"] and not det.training
    assert all(not p.requires_grad for p in det.parameters())
    assert det.model.state_dict().keys() == model.state_dict().keys()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(det.head_outputs(x), model(x)):
            assert torch.allclose(a, b, atol=1e-6)


def test_fp16_checkpoint_loads_as_float32(tmp_path, monkeypatch):
    model = tiny_v5()
    path = tmp_path / "half.pt"
    write_original_style(model, path, monkeypatch, half=True)
    ck = read_yolo_checkpoint(path)
    assert ck["state_dict"]["model.0.conv.weight"].dtype == torch.float16 and ck["source"] == "model"
    det = load_yolo(path, image_size=64)
    assert det.model.model[0].conv.weight.dtype == torch.float32
    assert torch.equal(det.model.model[0].conv.weight, model.model[0].conv.weight.half().float())


def test_ema_model_is_preferred(tmp_path, monkeypatch):
    a, b = tiny_v5(0), tiny_v5(1)
    path = tmp_path / "ema.pt"
    save_original_style(path, monkeypatch, model=(a, {"half": False}), ema=(b, {"half": False}), updates=10)
    assert read_yolo_checkpoint(path)["source"] == "ema"
    det = load_yolo(path, image_size=64)
    assert torch.equal(det.model.model[0].conv.weight, b.model[0].conv.weight)
    assert not torch.equal(det.model.model[0].conv.weight, a.model[0].conv.weight)


def test_v8_style_checkpoint_loads_strictly_and_reproduces_the_outputs(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = YOLOModel(TINY_V8).eval()
    path = tmp_path / "v8.pt"
    save_original_style(path, monkeypatch, names=V8_NAMES, model=(model, {"half": False}),
                        train_args={"imgsz": 64}, version="8.0.0")
    det = load_yolo(path, image_size=64)
    assert "ultralytics" not in sys.modules and det.model.version == 8
    assert "model.15.dfl.conv.weight" in det.model.state_dict()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(det.head_outputs(x), model(x)):
            assert torch.allclose(a, b, atol=1e-6)
    assert len(det.detect(x, conf_thres=0.0, max_det=7)[0]["boxes"]) == 7


def test_weights_that_do_not_fit_the_description(tmp_path, monkeypatch):
    model = tiny_v5()
    wider = copy.deepcopy(TINY_V5)
    wider["width_multiple"] = 0.25
    path = tmp_path / "misfit.pt"
    write_original_style(model, path, monkeypatch, cfg=wider)
    with pytest.raises(DfkdError, match=r"does not fit the network it describes: .*of another shape") as e:
        load_yolo(path, image_size=64)
    assert "\n" not in str(e.value)


def test_truncated_foreign_and_missing_files(tiny_ckpt, tmp_path):
    _, path = tiny_ckpt
    data = path.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    for bad, pattern in [(cut, "cannot read YOLO checkpoint"), (tmp_path / "none.pt", "not found")]:
        with pytest.raises(DfkdError, match=pattern) as e:
            load_yolo(bad)
        assert "\n" not in str(e.value)
    plain = tmp_path / "state.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "epoch": 3}, plain)
    with pytest.raises(DfkdError, match="not a YOLO checkpoint"):
        load_yolo(plain)
    sd = tmp_path / "sd.pt"
    torch.save(tiny_v5().state_dict(), sd)
    with pytest.raises(DfkdError, match="not a YOLO checkpoint"):
        load_yolo(sd)
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    with pytest.raises(DfkdError, match="cannot read YOLO checkpoint"):
        load_yolo(text)


PROBE = "dfkd_probe_never_imported"


@pytest.fixture()
def probe_module(tmp_path, monkeypatch):
    """A module that leaves a marker file when imported and another when its ``boom`` is called."""
    d = tmp_path / "probe"
    d.mkdir()
    marker = tmp_path / "imported"
    (d / f"{PROBE}.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        f"def boom(*a):\n    open({str(marker)!r} + '.called', 'w').close()\n")
    monkeypatch.syspath_prepend(str(d))
    yield marker
    sys.modules.pop(PROBE, None)


def _zip_with_pickle(tmp_path: Path, pkl: bytes, name: str) -> Path:
    """A torch zip checkpoint whose data.pkl is ``pkl``."""
    base = tmp_path / "base.pt"
    torch.save({"x": 1}, base)
    out = tmp_path / name
    with zipfile.ZipFile(base) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            body = pkl if info.filename.endswith("/data.pkl") else src.read(info)
            dst.writestr(info, body)
    return out


@pytest.mark.parametrize("container", ["zip", "legacy"])
@pytest.mark.parametrize("target", [f"{PROBE}\nboom", "os\nsystem", "builtins\neval", "models.common\nConvX"])
def test_non_allow_listed_callables_are_never_imported_or_called(tmp_path, probe_module, container, target):
    # GLOBAL target; ("echo pwned",); REDUCE; STOP  — what a malicious checkpoint does
    pkl = b"\x80\x02c" + target.encode() + b"\n" + pickle.dumps(("echo pwned",), protocol=2)[2:-1] + b"R."
    path = _zip_with_pickle(tmp_path, pkl, "evil.pt") if container == "zip" else tmp_path / "evil_legacy.pt"
    if container == "legacy":
        path.write_bytes(pkl)
    shown = target.replace("\n", ".").replace("builtins.", "")
    with pytest.raises(DfkdError, match="refusing YOLO checkpoint") as e:
        load_yolo(path)
    msg = str(e.value)
    assert "\n" not in msg and shown.split(".")[-1] in msg
    assert not probe_module.exists() and not Path(str(probe_module) + ".called").exists()
    assert PROBE not in sys.modules


def test_allow_listed_names_become_inert_even_when_called(tmp_path):
    # REDUCE on an allow-listed class calls only the stand-in: no YOLO (or any other) code runs
    pkl = b"\x80\x02cmodels.common\nConv\n" + pickle.dumps(("rm -rf /",), protocol=2)[2:-1] + b"R."
    path = _zip_with_pickle(tmp_path, pkl, "inert.pt")
    obj = load_inert(path, yolo_name_allowed)
    assert isinstance(obj, Stub) and type(obj).origin == "models.common.Conv" and obj._stub_args == ("rm -rf /",)
    assert "models" not in sys.modules


def test_allow_list():
    assert yolo_name_allowed("models.common.C3") and yolo_name_allowed("ultralytics.nn.modules.block.C2f")
    assert yolo_name_allowed("torch.nn.modules.conv.Conv2d")
    for name in ("os.system", "posix.system", "builtins.eval", "models.common.eval", "torch.nn.modules.conv.F",
                 "subprocess.Popen", "torch.nn.modules.module.Module.__init__", "models.common.os"):
        assert not yolo_name_allowed(name), name


# -- the shared YOLOv5n --------------------------------------------------------------------------------
def _yolov5n() -> Path:
    root = shared_data()
    if root is None:
        pytest.skip("DFKD_DATA not set: the shared YOLOv5n is not available")
    path = root / "teachers" / "yolov5n" / "yolov5n.pt"
    if not path.is_file():
        pytest.skip("DFKD_DATA has no teachers/yolov5n/yolov5n.pt")
    return path


def test_shared_yolov5n_loads_safely_and_strictly():
    det = load_yolo(_yolov5n())
    assert "models" not in sys.modules
    assert sum(p.numel() for p in det.parameters()) == 1_872_157
    assert len(det.batchnorm_layers()) == 57 and all(bn.eps == 1e-3 for bn in det.batchnorm_layers())
    assert det.model.strides == [8.0, 16.0, 32.0] and det.num_classes == 80
    assert det.class_names[0] == "person" and det.class_names[79] == "toothbrush"
    assert torch.allclose(det.model.anchors_px[2, 2], torch.tensor([373.0, 326.0]))


def test_shared_yolov5n_finds_the_objects_of_a_few_coco128_images():
    from dfkd.data.detection import load_detection
    from dfkd.eval.detection import evaluate_detector

    path = _yolov5n()
    coco128 = path.parents[2] / "detection" / "coco128"
    if not coco128.is_dir():
        pytest.skip("DFKD_DATA has no detection/coco128")
    ds = load_detection(coco128)
    det = load_yolo(path)
    r = evaluate_detector(det.for_map(), ds, batch_size=4, max_images=4)
    # the whole set scores mAP@.5 ≈ 0.55; a broken decode, letterbox or box mapping gives ≈ 0
    assert r["map50"] > 0.5, r
