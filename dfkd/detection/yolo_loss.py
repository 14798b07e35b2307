"""Training losses of the YOLO detectors dfkd rebuilds (:mod:`dfkd.detection.yolo`), written for dfkd
from the published method descriptions (no YOLO code is imported).

Both take the network's raw per-level head outputs (``YOLOModel.forward``) and torchvision-style
targets — one ``{"boxes": (K, 4) xyxy in input pixels, "labels": (K,)}`` per image — and return a
dict of loss terms (their sum is the training loss). The original training code multiplies its
batch-mean loss by the batch size and accumulates gradients over a nominal batch of 64 images per
optimizer step; here the batch-mean loss is multiplied by ``gain`` = 64 whatever the batch, so the
loss is the original's per nominal batch and its scale does not change with the batch size. (It
also puts the teacher's loss on the scale box inversion's default weights were set for: with
``gain`` = 1 the BatchNorm prior outweighs it and the images drift away from the sampled boxes.)

* :func:`yolov5_loss` (anchor head): each target goes to every anchor whose width and height
  ratios to it lie within ``anchor_t`` (4), in its own cell and the two neighbouring cells nearest
  its centre; box loss 1 − CIoU of the decoded box (``xy = 2σ − 0.5``, ``wh = (2σ)² · anchor``);
  objectness BCE towards the CIoU of each assigned prediction (0 elsewhere; levels weighted
  4 / 1 / 0.4); class BCE on the assigned predictions. Weights box 0.05, obj 1.0, cls 0.5, scaled
  by 3 / levels, the objectness weight by (image area / 640²) and the class weight by classes / 80,
  as in YOLOv5's ``hyp.scratch-low``.
* :func:`yolov8_loss` (anchor-free DFL head): the task-aligned assigner (:func:`tal_assign`: per
  target the ``topk`` = 10 cell centres inside it with the highest score^0.5 · CIoU^6, an anchor
  claimed by several targets keeps the one it overlaps most, soft class targets normalised by
  the best alignment); class BCE summed and divided by the target-score sum; 1 − CIoU and the
  distribution focal loss on the positives, weighted by their target scores. Weights box 7.5,
  cls 0.5, dfl 1.5. ``hard_targets=1`` gives each assigned anchor a target score of 1 for its class
  instead: the soft scores are about the IoU of the current prediction, so on images where the
  network sees nothing (box inversion starting from noise) they are near 0 and the loss would teach
  "nothing here" — a YOLOv8 teacher's loss for inversion uses hard targets
  (:func:`dfkd.detection.yolo_task.load_yolo_teacher`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

V5_HYP = {"box": 0.05, "obj": 1.0, "cls": 0.5, "anchor_t": 4.0, "gain": 64.0}
V8_HYP = {"box": 7.5, "cls": 0.5, "dfl": 1.5, "topk": 10, "alpha": 0.5, "beta": 6.0, "gain": 64.0, "hard_targets": 0}
_V5_BALANCE = {3: [4.0, 1.0, 0.4]}


def xywh_xyxy(b: torch.Tensor) -> torch.Tensor:
    return torch.cat((b[..., :2] - b[..., 2:4] / 2, b[..., :2] + b[..., 2:4] / 2), -1)


def ciou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Complete IoU (Zheng et al. 2020) of paired xyxy boxes ``a``, ``b`` (..., 4) → (...)."""
    ax1, ay1, ax2, ay2 = a.unbind(-1)
    bx1, by1, bx2, by2 = b.unbind(-1)
    w1, h1 = ax2 - ax1, ay2 - ay1 + eps
    w2, h2 = bx2 - bx1, by2 - by1 + eps
    inter = (torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)).clamp(0) * \
            (torch.minimum(ay2, by2) - torch.maximum(ay1, by1)).clamp(0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    cw = torch.maximum(ax2, bx2) - torch.minimum(ax1, bx1)
    ch = torch.maximum(ay2, by2) - torch.minimum(ay1, by1)
    c2 = cw ** 2 + ch ** 2 + eps
    rho2 = ((bx1 + bx2 - ax1 - ax2) ** 2 + (by1 + by2 - ay1 - ay2) ** 2) / 4
    v = (4 / math.pi ** 2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)) ** 2
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)


def _target_table(targets: Sequence[dict], device: torch.device) -> torch.Tensor:
    """(n, 6): image index, class, cx, cy, w, h (pixels) of every target box."""
    rows = []
    for i, t in enumerate(targets):
        b = t["boxes"].to(device).float().reshape(-1, 4)
        if len(b):
            xywh = torch.cat(((b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]), 1)
            rows.append(torch.cat((torch.full((len(b), 1), float(i), device=device),
                                   t["labels"].to(device).float().reshape(-1, 1), xywh), 1))
    return torch.cat(rows) if rows else torch.zeros(0, 6, device=device)


def yolov5_loss(head: nn.Module, raw: Sequence[torch.Tensor], targets: Sequence[dict],
                hyp: dict | None = None) -> dict[str, torch.Tensor]:
    """YOLOv5's loss (see the module docstring) of a ``Detect`` head's raw outputs (B, na, H, W, 5 + nc)."""
    hyp = {**V5_HYP, **(hyp or {})}
    device = raw[0].device
    nl, nc = len(raw), int(head.nc)
    table = _target_table(targets, device)
    balance = _V5_BALANCE.get(nl, [4.0, 1.0, 0.25, 0.06, 0.02][:nl])
    off = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], device=device).float() * 0.5
    zero = raw[0].sum() * 0.0
    lbox, lobj, lcls = zero, zero, zero
    area = 0.0
    for i, p in enumerate(raw):
        p = p.float()
        b, na, h, w, _ = p.shape
        stride = float(head.stride[i])
        area = max(area, h * w * stride * stride)
        anchors = head.anchors[i].to(device).float()  # (na, 2), in grid units
        tobj = torch.zeros(p.shape[:4], device=device)
        if len(table):
            t = table[:, 2:6] / stride
            r = t[None, :, 2:4] / anchors[:, None]
            a_idx, t_idx = (torch.max(r, 1 / r).max(2).values < hyp["anchor_t"]).nonzero(as_tuple=True)
            tt, img, cls, a = t[t_idx], table[t_idx, 0].long(), table[t_idx, 1].long(), a_idx
            gxy = tt[:, :2]
            gxi = torch.tensor([w, h], device=device).float() - gxy
            j, k = ((gxy % 1 < 0.5) & (gxy > 1)).T
            l, m = ((gxi % 1 < 0.5) & (gxi > 1)).T
            o_idx, s_idx = torch.stack((torch.ones_like(j), j, k, l, m)).nonzero(as_tuple=True)
            tt, img, cls, a = tt[s_idx], img[s_idx], cls[s_idx], a[s_idx]
            gij = (tt[:, :2] - off[o_idx]).long()
            gi, gj = gij[:, 0].clamp(0, w - 1), gij[:, 1].clamp(0, h - 1)
            if len(img):
                tbox = torch.cat((tt[:, :2] - torch.stack((gi, gj), 1), tt[:, 2:4]), 1)
                ps = p[img, a, gj, gi]
                pxy = ps[:, :2].sigmoid() * 2 - 0.5
                pwh = (ps[:, 2:4].sigmoid() * 2) ** 2 * anchors[a]
                iou = ciou(xywh_xyxy(torch.cat((pxy, pwh), 1)), xywh_xyxy(tbox))
                lbox = lbox + (1.0 - iou).mean()
                tobj[img, a, gj, gi] = iou.detach().clamp(0)
                if nc > 1:
                    tc = torch.zeros_like(ps[:, 5:])
                    tc[torch.arange(len(cls), device=device), cls] = 1.0
                    lcls = lcls + F.binary_cross_entropy_with_logits(ps[:, 5:], tc)
        lobj = lobj + F.binary_cross_entropy_with_logits(p[..., 4], tobj) * balance[i]
    scale = 3.0 / nl * hyp["gain"]
    return {"loss_box": lbox * hyp["box"] * scale,
            "loss_obj": lobj * hyp["obj"] * scale * area / 640.0 ** 2,
            "loss_cls": lcls * hyp["cls"] * scale * nc / 80.0}


def _points(raw: Sequence[torch.Tensor], strides: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres (A, 2) in grid units of their level and each one's stride (A, 1)."""
    points, out = [], []
    for r, s in zip(raw, strides):
        h, w = r.shape[-2:]
        gy, gx = torch.meshgrid(torch.arange(h, device=r.device), torch.arange(w, device=r.device), indexing="ij")
        points.append(torch.stack((gx, gy), -1).view(-1, 2).float() + 0.5)
        out.append(torch.full((h * w, 1), float(s), device=r.device))
    return torch.cat(points), torch.cat(out)


@torch.no_grad()
def tal_assign(pd_scores: torch.Tensor, pd_boxes: torch.Tensor, anchors: torch.Tensor, gt_labels: torch.Tensor,
               gt_boxes: torch.Tensor, mask_gt: torch.Tensor, num_classes: int, topk: int = 10,
               alpha: float = 0.5, beta: float = 6.0, hard: bool = False, eps: float = 1e-9):
    """The task-aligned assigner (TOOD, Feng et al. 2021, as YOLOv8 uses it).

    ``pd_scores`` (B, A, C) probabilities, ``pd_boxes`` (B, A, 4) xyxy, ``anchors`` (A, 2) cell centres
    (same units as the boxes), ``gt_labels`` (B, M), ``gt_boxes`` (B, M, 4), ``mask_gt`` (B, M) real
    targets. Returns ``target_boxes`` (B, A, 4), ``target_scores`` (B, A, C) and ``fg`` (B, A);
    ``hard``: target scores 1 (not the normalised alignment) for the class of each assigned anchor.
    """
    b, a, _ = pd_scores.shape
    m = gt_boxes.shape[1]
    lt = anchors[None, None] - gt_boxes[:, :, None, :2]
    rb = gt_boxes[:, :, None, 2:] - anchors[None, None]
    mask = (torch.cat((lt, rb), -1).amin(-1) > eps) & mask_gt[:, :, None]  # (B, M, A): centre inside
    scores = pd_scores.gather(2, gt_labels[:, None, :].expand(b, a, m)).transpose(1, 2)  # (B, M, A)
    overlaps = torch.zeros(b, m, a, device=pd_scores.device)
    if mask.any():
        g = gt_boxes[:, :, None].expand(b, m, a, 4)[mask]
        p = pd_boxes[:, None].expand(b, m, a, 4)[mask]
        overlaps[mask] = ciou(g, p).clamp(0)
    align = scores.pow(alpha) * overlaps.pow(beta) * mask
    k = min(topk, a)
    top = torch.zeros_like(align).scatter_(-1, align.topk(k, dim=-1).indices, 1.0)
    pos = top * mask  # (B, M, A)
    fg = pos.sum(1)
    if (fg > 1).any():  # an anchor claimed by several targets keeps the one it overlaps most
        best = F.one_hot(overlaps.argmax(1), m).permute(0, 2, 1).to(pos.dtype)
        pos = torch.where((fg > 1)[:, None, :].expand(-1, m, -1), best, pos)
        fg = pos.sum(1)
    idx = pos.argmax(1)  # (B, A)
    labels = gt_labels.gather(1, idx)
    boxes = gt_boxes.gather(1, idx[..., None].expand(-1, -1, 4))
    target_scores = F.one_hot(labels, num_classes).float() * (fg > 0)[..., None]
    if hard:
        return boxes, target_scores, fg > 0
    align = align * pos
    norm = (align * (overlaps * pos).amax(-1, keepdim=True) / (align.amax(-1, keepdim=True) + eps)).amax(1)
    return boxes, target_scores * norm[..., None], fg > 0


def yolov8_loss(head: nn.Module, raw: Sequence[torch.Tensor], targets: Sequence[dict],
                hyp: dict | None = None) -> dict[str, torch.Tensor]:
    """YOLOv8's loss (see the module docstring) of a ``DetectV8`` head's raw outputs (B, 4·R + nc, H, W)."""
    hyp = {**V8_HYP, **(hyp or {})}
    device = raw[0].device
    nc, reg = int(head.nc), int(head.reg_max)
    b = raw[0].shape[0]
    flat = torch.cat([r.float().flatten(2) for r in raw], 2).transpose(1, 2)  # (B, A, 4R + nc)
    dist_logits, cls_logits = flat.split((4 * reg, nc), -1)
    points, strides = _points(raw, [float(s) for s in head.stride])
    bins = torch.arange(reg, device=device, dtype=torch.float32)
    ltrb = (dist_logits.view(b, -1, 4, reg).softmax(-1) * bins).sum(-1)  # (B, A, 4), grid units
    pred_boxes = torch.cat((points - ltrb[..., :2], points + ltrb[..., 2:]), -1)
    # targets padded to (B, M)
    m = max((len(t["boxes"]) for t in targets), default=0)
    gt_boxes = torch.zeros(b, max(m, 1), 4, device=device)
    gt_labels = torch.zeros(b, max(m, 1), dtype=torch.long, device=device)
    mask_gt = torch.zeros(b, max(m, 1), dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        n = len(t["boxes"])
        if n:
            gt_boxes[i, :n] = t["boxes"].to(device).float()
            gt_labels[i, :n] = t["labels"].to(device).long()
            mask_gt[i, :n] = True
    t_boxes, t_scores, fg = tal_assign(cls_logits.detach().sigmoid(), (pred_boxes.detach() * strides),
                                       points * strides, gt_labels, gt_boxes, mask_gt, nc, int(hyp["topk"]),
                                       float(hyp["alpha"]), float(hyp["beta"]), hard=bool(hyp["hard_targets"]))
    total = t_scores.sum().clamp_min(1.0)
    lcls = F.binary_cross_entropy_with_logits(cls_logits, t_scores, reduction="none").sum() / total
    lbox = ldfl = flat.sum() * 0.0
    if fg.any():
        tb = t_boxes / strides  # grid units
        weight = t_scores.sum(-1)[fg]
        iou = ciou(pred_boxes[fg], tb[fg])
        lbox = ((1.0 - iou) * weight).sum() / total
        target = torch.cat((points - tb[..., :2], tb[..., 2:] - points), -1)[fg].clamp(0, reg - 1 - 0.01)
        logits = dist_logits[fg].reshape(-1, reg)
        tl = target.reshape(-1).long()
        wl = (tl + 1).float() - target.reshape(-1)
        dfl = (F.cross_entropy(logits, tl, reduction="none") * wl
               + F.cross_entropy(logits, tl + 1, reduction="none") * (1 - wl)).view(-1, 4).mean(-1)
        ldfl = (dfl * weight).sum() / total
    g = hyp["gain"]
    return {"loss_box": lbox * hyp["box"] * g, "loss_cls": lcls * hyp["cls"] * g, "loss_dfl": ldfl * hyp["dfl"] * g}


def yolo_loss(model: nn.Module, raw: Sequence[torch.Tensor], targets: Sequence[dict],
              hyp: dict | None = None) -> dict[str, torch.Tensor]:
    """The loss of a :class:`~dfkd.detection.yolo.YOLOModel` (v5 or v8 head) for ``targets``."""
    return (yolov5_loss if model.version == 5 else yolov8_loss)(model.head, raw, targets, hyp)
