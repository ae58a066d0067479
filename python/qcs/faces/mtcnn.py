"""A five-landmark face detector: the three-stage cascade of MTCNN (Zhang et al., "Joint
Face Detection and Alignment using Multi-task Cascaded Convolutional Networks", 2016).

Stage 1 (P-Net) is a fully convolutional 12x12 window classifier run over an image
pyramid; stage 2 (R-Net) re-scores 24x24 crops of the surviving windows; stage 3 (O-Net)
re-scores 48x48 crops and regresses five landmarks. Every stage also regresses the box
corners; overlapping boxes are merged by non-maximum suppression (NMS) after each stage.

The weights (``weights/mtcnn.safetensors``, MIT, see ``weights/NOTICE.md``) are the
original authors' networks. All images of one call are processed together: the pyramid
levels of images of the same size are stacked into one P-Net batch, and the crops of all
images go through R-Net and O-Net in batches, on the detector's device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

__all__ = [
    "MTCNN",
    "WEIGHTS",
    "ONet",
    "PNet",
    "RNet",
    "apply_regression",
    "nms",
    "square_boxes",
]

WEIGHTS = Path(__file__).parent / "weights" / "mtcnn.safetensors"


class _ConvPReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, k), nn.PReLU(cout))


class PNet(nn.Module):
    """Proposal network: ``[B, 3, H, W] -> (face prob [B, H', W'], box regression
    [B, 4, H', W'])`` with one output cell per 12x12 window at stride 2."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3 = (_ConvPReLU(3, 10, 3), _ConvPReLU(10, 16, 3),
                                              _ConvPReLU(16, 32, 3))
        self.score, self.box = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.conv1(x), 2, 2, ceil_mode=True)
        x = self.conv3(self.conv2(x))
        return torch.softmax(self.score(x), dim=1)[:, 1], self.box(x)


def _flatten(x: torch.Tensor) -> torch.Tensor:
    # the dense layers were trained on features flattened in (width, height, channel)
    # order, the original framework's layout
    return x.permute(0, 3, 2, 1).flatten(1)


class RNet(nn.Module):
    """Refinement network: ``[N, 3, 24, 24] -> (face prob [N], box regression [N, 4])``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3 = (_ConvPReLU(3, 28, 3), _ConvPReLU(28, 48, 3),
                                              _ConvPReLU(48, 64, 2))
        self.dense = nn.Sequential(nn.Linear(576, 128), nn.PReLU(128))
        self.score, self.box = nn.Linear(128, 2), nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.conv1(x), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.conv2(x), 3, 2, ceil_mode=True)
        x = self.dense(_flatten(self.conv3(x)))
        return torch.softmax(self.score(x), dim=1)[:, 1], self.box(x)


class ONet(nn.Module):
    """Output network: ``[N, 3, 48, 48] -> (face prob [N], box regression [N, 4],
    landmarks [N, 10])``; landmarks are five x then five y, as fractions of the box."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.conv3 = (_ConvPReLU(3, 32, 3), _ConvPReLU(32, 64, 3),
                                              _ConvPReLU(64, 64, 3))
        self.conv4 = _ConvPReLU(64, 128, 2)
        self.dense = nn.Sequential(nn.Linear(1152, 256), nn.PReLU(256))
        self.score, self.box, self.points = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.conv1(x), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.conv2(x), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.conv3(x), 2, 2, ceil_mode=True)
        x = self.dense(_flatten(self.conv4(x)))
        return torch.softmax(self.score(x), dim=1)[:, 1], self.box(x), self.points(x)


def _weight_names(net: str, module: nn.Module) -> dict[str, str]:
    """Our parameter names -> the names in the weight file (the original layer names)."""
    convs = {"conv1": "1", "conv2": "2", "conv3": "3", "conv4": "4"}
    heads = {"pnet": ("conv4_1", "conv4_2", None, None),
             "rnet": ("dense5_1", "dense5_2", None, "dense4"),
             "onet": ("dense6_1", "dense6_2", "dense6_3", "dense5")}[net]
    out = {}
    for name in module.state_dict():
        first, *rest = name.split(".")
        if first in convs:
            src = (f"conv{convs[first]}.{rest[1]}" if rest[0] == "0"
                   else f"prelu{convs[first]}.weight")
        elif first == "dense":
            src = (f"{heads[3]}.{rest[1]}" if rest[0] == "0"
                   else f"prelu{heads[3][-1]}.weight")
        else:
            src = f"{heads[('score', 'box', 'points').index(first)]}.{rest[0]}"
        out[name] = f"{net}.{src}"
    return out


def load_networks(path: str | Path = WEIGHTS) -> tuple[PNet, RNet, ONet]:
    """The three networks with the shipped weights (``strict``: every tensor must match)."""
    from safetensors.torch import load_file
    tensors = load_file(str(path))
    nets = (PNet(), RNet(), ONet())
    for tag, net in zip(("pnet", "rnet", "onet"), nets):
        names = _weight_names(tag, net)
        net.load_state_dict({ours: tensors[theirs] for ours, theirs in names.items()})
        net.eval().requires_grad_(False)
    return nets


# --------------------------------------------------------------------------- box helpers
def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, mode: str = "union"
        ) -> torch.Tensor:
    """Greedy non-maximum suppression: indices of the kept boxes, best score first.

    ``boxes`` ``[N, 4]`` as ``x1, y1, x2, y2``; a box is dropped when its overlap with a
    kept one exceeds ``threshold``: intersection over union (``mode="union"``) or over
    the smaller box's area (``"min"``, which also removes a box nested in another)."""
    if mode not in ("union", "min"):
        raise ValueError(f"mode must be 'union' or 'min', got {mode!r}")
    order = torch.argsort(scores, descending=True)
    boxes = boxes[order].double()
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    lt = torch.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = torch.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    denom = (area[:, None] + area[None, :] - inter if mode == "union"
             else torch.minimum(area[:, None], area[None, :]))
    overlap = (inter / denom.clamp(min=1e-9)).cpu().numpy()
    alive = np.ones(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if alive[i]:
            keep.append(i)
            alive &= overlap[i] <= threshold
    return order[torch.as_tensor(keep, dtype=torch.long, device=order.device)]


def apply_regression(boxes: torch.Tensor, reg: torch.Tensor) -> torch.Tensor:
    """Move each corner of ``boxes`` (``x1, y1, x2, y2``) by ``reg`` (``dx1, dy1, dx2,
    dy2``) times the box's width / height."""
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    return boxes + reg * wh


def square_boxes(boxes: torch.Tensor) -> torch.Tensor:
    """Squares with the same centres, side = the longer side of each box."""
    c = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).max(dim=1, keepdim=True).values / 2
    return torch.cat([c - half, c + half], dim=1)


@dataclass
class _Candidates:
    """Boxes of one cascade stage: ``boxes [N, 4]``, ``scores [N]``, ``image [N]`` (index
    of the image each came from), ``points [N, 5, 2]`` after the last stage."""

    boxes: torch.Tensor
    scores: torch.Tensor
    image: torch.Tensor
    points: torch.Tensor | None = None

    def take(self, idx: torch.Tensor) -> _Candidates:
        """The candidates at ``idx``."""
        return _Candidates(self.boxes[idx], self.scores[idx], self.image[idx],
                           None if self.points is None else self.points[idx])


def _per_image_nms(c: _Candidates, threshold: float, mode: str = "union") -> _Candidates:
    keep = [torch.nonzero(c.image == i).flatten() for i in torch.unique(c.image)]
    keep = [idx[nms(c.boxes[idx], c.scores[idx], threshold, mode)] for idx in keep]
    return c.take(torch.cat(keep) if keep else torch.zeros(0, dtype=torch.long,
                                                            device=c.boxes.device))


# --------------------------------------------------------------------------- the cascade
class MTCNN:
    """The detector. ``detect(batch) -> [(boxes [n, 4] x1 y1 x2 y2, scores [n],
    landmarks [n, 5, 2])]`` per image, in pixels of that image, best score first.

    Args:
        device: where the networks run.
        min_face: the smallest face side searched, in pixels.
        min_face_fraction: ... and at least this fraction of the image's shorter side (a
            large photo is not searched for faces a few pixels wide).
        factor: ratio between pyramid levels.
        thresholds: face-probability cut of P-Net, R-Net and O-Net.
        batch: crops per R-Net / O-Net forward pass.
    """

    def __init__(self, device: str | torch.device = "cpu", min_face: float = 20.0,
                 min_face_fraction: float = 0.05, factor: float = 0.709,
                 thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7),
                 batch: int = 512) -> None:
        if min_face < 12:
            raise ValueError(f"min_face must be >= 12 pixels (P-Net's window), got {min_face}")
        if not 0 <= min_face_fraction < 1:
            raise ValueError(f"min_face_fraction must be in [0, 1), got {min_face_fraction}")
        if not 0 < factor < 1:
            raise ValueError(f"factor must be in (0, 1), got {factor}")
        self.device = torch.device(device)
        self.pnet, self.rnet, self.onet = (n.to(self.device) for n in load_networks())
        self.min_face, self.min_face_fraction = min_face, min_face_fraction
        self.factor, self.thresholds, self.batch = factor, thresholds, batch

    def scales(self, height: int, width: int) -> list[float]:
        """Pyramid scales: the first maps the smallest face searched onto P-Net's 12 px
        window, the last leaves the shorter side at least 12 px."""
        m = 12.0 / max(self.min_face, self.min_face_fraction * min(height, width))
        side, out = min(height, width) * m, []
        while side >= 12:
            out.append(m * self.factor ** len(out))
            side *= self.factor
        return out

    @staticmethod
    def _normalise(x: torch.Tensor) -> torch.Tensor:
        return (x - 127.5) / 128.0

    def _stage1(self, images: torch.Tensor, first: int) -> _Candidates:
        """P-Net over the pyramid of ``images`` (``[B, 3, H, W]`` float 0..255, equal
        sizes; image indices start at ``first``)."""
        found = []
        for s in self.scales(images.shape[2], images.shape[3]):
            size = (max(12, math.ceil(images.shape[2] * s)),
                    max(12, math.ceil(images.shape[3] * s)))
            level = F.interpolate(images, size=size, mode="area")
            prob, reg = self.pnet(self._normalise(level))
            b, yy, xx = torch.nonzero(prob >= self.thresholds[0], as_tuple=True)
            if len(b) == 0:
                continue
            sx, sy = images.shape[3] / size[1], images.shape[2] / size[0]
            x1, y1 = 2 * xx * sx, 2 * yy * sy
            boxes = torch.stack([x1, y1, x1 + 12 * sx, y1 + 12 * sy], 1).float()
            # windows are merged before their regression is applied (``points`` carries
            # the regression until then)
            c = _Candidates(boxes, prob[b, yy, xx], b + first, reg[b, :, yy, xx])
            found.append(_per_image_nms(c, 0.5))
        if not found:
            e = torch.zeros(0, device=self.device)
            return _Candidates(e.view(0, 4), e, e.long(), e.view(0, 4))
        c = _per_image_nms(_Candidates(*(torch.cat(t) for t in zip(
            *((f.boxes, f.scores, f.image, f.points) for f in found)))), 0.7)
        return _Candidates(apply_regression(c.boxes, c.points), c.scores, c.image)

    def _crops(self, groups: list[tuple[torch.Tensor, int]], c: _Candidates, size: int
               ) -> torch.Tensor:
        """``size x size`` crops (area-averaged, zero outside the image) of every box."""
        out = torch.empty(len(c.boxes), 3, size, size, device=self.device)
        for images, first in groups:
            sel = torch.nonzero((c.image >= first) & (c.image < first + len(images))).flatten()
            if len(sel):
                rois = torch.cat([(c.image[sel] - first)[:, None].float(), c.boxes[sel]], 1)
                out[sel] = roi_align(images, rois, size, 1.0, sampling_ratio=-1, aligned=True)
        return self._normalise(out)

    def _run(self, net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
        parts = [net(x[i:i + self.batch]) for i in range(0, len(x), self.batch)]
        return [torch.cat(t) for t in zip(*parts)]

    def _stage2(self, groups, c: _Candidates) -> _Candidates:
        c = _Candidates(square_boxes(c.boxes), c.scores, c.image)
        if len(c.boxes) == 0:
            return c
        prob, reg = self._run(self.rnet, self._crops(groups, c, 24))
        keep = torch.nonzero(prob >= self.thresholds[1]).flatten()
        c = _Candidates(apply_regression(c.boxes[keep], reg[keep]), prob[keep], c.image[keep])
        return _per_image_nms(c, 0.7)

    def _stage3(self, groups, c: _Candidates) -> _Candidates:
        c = _Candidates(square_boxes(c.boxes), c.scores, c.image)
        if len(c.boxes) == 0:
            c.points = c.boxes.new_zeros(0, 5, 2)
            return c
        prob, reg, pts = self._run(self.onet, self._crops(groups, c, 48))
        keep = torch.nonzero(prob >= self.thresholds[2]).flatten()
        boxes, pts = c.boxes[keep], pts[keep]
        wh = boxes[:, 2:] - boxes[:, :2]
        points = torch.stack([boxes[:, None, 0] + wh[:, None, 0] * pts[:, :5],
                              boxes[:, None, 1] + wh[:, None, 1] * pts[:, 5:]], dim=-1)
        c = _Candidates(apply_regression(boxes, reg[keep]), prob[keep], c.image[keep], points)
        return _per_image_nms(c, 0.7, mode="min")

    @torch.no_grad()
    def detect(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Faces in each RGB ``uint8 [H, W, 3]`` image: ``(boxes [n, 4], scores [n],
        landmarks [n, 5, 2])`` (left eye, right eye, nose, left and right mouth corner as
        seen in the image), float64 numpy, best first."""
        if not images:
            return []
        groups, first, by_size = [], 0, {}
        for i, im in enumerate(images):
            if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
                raise ValueError(f"images[{i}] must be uint8 [H, W, 3], got {im.dtype} "
                                 f"{list(im.shape)}")
            by_size.setdefault(im.shape[:2], []).append(i)
        order = [i for idx in by_size.values() for i in idx]
        for idx in by_size.values():
            batch = torch.from_numpy(np.stack([images[i] for i in idx])).to(self.device)
            groups.append((batch.permute(0, 3, 1, 2).float(), first))
            first += len(idx)
        stage1 = [self._stage1(g, f) for g, f in groups]
        c = _Candidates(*(torch.cat(t) for t in zip(*((s.boxes, s.scores, s.image)
                                                       for s in stage1))))
        c = self._stage3(groups, self._stage2(groups, c))
        out = [None] * len(images)
        for pos, i in enumerate(order):
            sel = torch.nonzero(c.image == pos).flatten()
            sel = sel[torch.argsort(c.scores[sel], descending=True)]
            out[i] = (c.boxes[sel].double().cpu().numpy(), c.scores[sel].double().cpu().numpy(),
                      c.points[sel].double().cpu().numpy())
        return out
