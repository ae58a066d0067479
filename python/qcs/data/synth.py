"""Built-in data: a procedurally drawn facial-expression dataset in RAF-DB layout.

Seven classes in RAF-DB order (surprise, fear, disgust, happiness, sadness, anger, neutral)
are told apart only by expression cues: mouth curve, opening and width, brow angle and
height, eye opening (and nose wrinkles for disgust). Everything else is nuisance that
carries no label: skin tone, face shape, size and position, background colour and texture,
glasses / hat / beard, lighting gradient and sensor noise. Each image is drawn from its
own seeded generator, so the dataset is a pure function of its parameters.

``bias=True`` ties the background colour to the class in the *training* split only (with
probability ``bias_strength``; otherwise, and always in the test split, it is random):
a shortcut that does not transfer, the situation of the paper's Fig. 1.

Layout written (what :func:`qcs.data.datasets.raf_db` reads)::

    OUT/basic/EmoLabel/list_patition_label.txt   # "train_00001.jpg 4" (labels 1-7)
    OUT/basic/Image/aligned/train_00001_aligned.jpg
    OUT/basic/synth_factors.jsonl                 # every image's drawn factors
    OUT/basic/synth.json                          # the generator parameters
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["BACKGROUNDS", "CLASSES", "SynthParams", "draw_face", "ensure_synth", "generate"]

CLASSES = ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")

# Per-class means of the expression cues:
# (mouth curve, mouth open, mouth width, brow angle (+: inner ends up), brow height, eye open)
_CUES = np.array([
    [0.0, 0.85, 0.75, 0.1, 1.0, 1.45],     # surprise: round open mouth, high brows, wide eyes
    [-0.25, 0.45, 1.2, 0.7, 0.6, 1.3],     # fear: stretched half-open mouth, raised inner brows
    [-0.55, 0.15, 0.9, -0.4, -0.4, 0.6],   # disgust: down-turned, narrowed eyes (+ wrinkles)
    [0.9, 0.3, 1.2, 0.0, 0.1, 0.8],        # happiness: smile
    [-0.8, 0.0, 0.9, 0.75, 0.15, 0.7],     # sadness: frown, inner brows up
    [-0.1, 0.05, 0.8, -0.85, -0.55, 0.85],  # anger: pressed mouth, lowered V brows
    [0.0, 0.0, 1.0, 0.0, 0.0, 1.0],        # neutral
])
_CUE_JITTER = np.array([0.2, 0.12, 0.12, 0.2, 0.2, 0.15])  # intra-class variation

BACKGROUNDS = np.array([  # 7 distinct background colours (one per class under --bias)
    [200, 70, 70], [70, 160, 70], [70, 90, 200], [210, 190, 60], [160, 70, 180],
    [60, 180, 190], [130, 130, 130]], dtype=np.float64)
_SKIN = (np.array([250, 220, 195.0]), np.array([95, 60, 40.0]))  # light .. dark


@dataclass
class SynthParams:
    """What the generated dataset is a function of."""

    seed: int = 0
    train_per_class: int = 300
    test_per_class: int = 100
    size: int = 100                # RAF-DB aligned images are 100x100
    bias: bool = False
    bias_strength: float = 0.9

    def tag(self) -> str:
        """A directory name that identifies these parameters (for the cache)."""
        bias = f"-bias{self.bias_strength:g}" if self.bias else ""
        return (f"synth-v2-s{self.seed}-n{self.train_per_class}x{self.test_per_class}"
                f"-px{self.size}{bias}")


def _bezier(p0, p1, p2, steps: int = 16) -> list[tuple[float, float]]:
    """Points on the quadratic Bezier curve p0 -> p2 with control p1."""
    out = []
    for i in range(steps + 1):
        t = i / steps
        out.append(((1 - t) ** 2 * p0[0] + 2 * (1 - t) * t * p1[0] + t * t * p2[0],
                    (1 - t) ** 2 * p0[1] + 2 * (1 - t) * t * p1[1] + t * t * p2[1]))
    return out


@dataclass
class _Face:
    """Where the face is drawn (canvas pixels) and its colours."""

    cx: float
    cy: float
    fw: float                 # half width of the face ellipse
    fh: float                 # half height
    skin: tuple[int, ...]
    lw: int                   # line width
    dark: tuple[int, int, int] = (40, 25, 20)


def _canvas(rng: np.random.Generator, s: int, background: int) -> tuple[Image.Image, int]:
    """The background: colour index ``background`` jittered, with a texture drawn from
    ``rng`` (0 plain, 1 vertical gradient, 2 stripes)."""
    bg = np.clip(BACKGROUNDS[background] + rng.normal(0, 12, 3), 0, 255)
    texture = int(rng.integers(3))
    arr = np.empty((s, s, 3))
    arr[:] = bg
    if texture == 1:
        arr *= np.linspace(0.75, 1.15, s)[:, None, None]
    elif texture == 2:
        arr *= (1 + 0.12 * np.sign(np.sin(np.arange(s) / s * rng.uniform(6, 20))))[None, :, None]
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), texture


def _draw_eyes_brows(d: ImageDraw.ImageDraw, f: _Face, eye_open: float, brow_angle: float,
                     brow_h: float) -> tuple[float, float, float]:
    """Eyes (opened by ``eye_open``) and brows (inner ends raised by ``brow_angle``, both
    by ``brow_h``); returns the eye offset, height and half width."""
    cx, cy, fw, fh = f.cx, f.cy, f.fw, f.fh
    ex, ey = 0.42 * fw, cy - 0.2 * fh
    ew, eh = 0.24 * fw, 0.15 * fh * eye_open
    for side in (-1, 1):
        x = cx + side * ex
        d.ellipse([x - ew, ey - eh, x + ew, ey + eh], fill=(245, 245, 245), outline=f.dark)
        pr = min(eh, 0.11 * fw)
        d.ellipse([x - pr, ey - pr, x + pr, ey + pr], fill=(30, 30, 50))
    by = ey - 0.26 * fh - 0.14 * fh * brow_h
    for side in (-1, 1):
        inner = (cx + side * 0.12 * fw, by - 0.2 * fh * brow_angle)
        outer = (cx + side * 0.7 * fw, by + 0.08 * fh * brow_angle)
        d.line([inner, outer], fill=f.dark, width=2 * f.lw)
    return ex, ey, ew


def _draw_nose_mouth(d: ImageDraw.ImageDraw, f: _Face, rng: np.random.Generator, label: int,
                     curve: float, mouth_open: float, mouth_w: float) -> float:
    """The nose with wrinkles beside it (mostly disgust), and the mouth: upper lip curve
    (corners up for ``curve > 0``), lower lip below it when open. Returns the mouth's y."""
    cx, cy, fw, fh, lw = f.cx, f.cy, f.fw, f.fh, f.lw
    d.line([(cx, cy - 0.05 * fh), (cx - 0.06 * fw, cy + 0.18 * fh), (cx, cy + 0.2 * fh)],
           fill=tuple(int(c * 0.75) for c in f.skin), width=lw)
    if rng.uniform() < (0.8 if label == 2 else 0.08):
        for side in (-1, 1):
            x = cx + side * 0.14 * fw
            d.line([(x, cy - 0.02 * fh), (x + side * 0.08 * fw, cy + 0.1 * fh)],
                   fill=tuple(int(c * 0.6) for c in f.skin), width=lw)
    my, half = cy + 0.5 * fh, 0.42 * fw * mouth_w
    bend = 0.3 * fh * curve
    left, right = (cx - half, my - bend), (cx + half, my - bend)
    upper = _bezier(left, (cx, my + bend), right)
    lower = _bezier(left, (cx, my + bend + 0.75 * fh * mouth_open), right)
    if mouth_open > 0.05:
        d.polygon(upper + lower[::-1], fill=(90, 20, 30))
    d.line(upper, fill=(120, 30, 40), width=lw + 1)
    if mouth_open > 0.05:
        d.line(lower, fill=(120, 30, 40), width=lw + 1)
    return my


def _draw_accessories(d: ImageDraw.ImageDraw, f: _Face, rng: np.random.Generator, ex: float,
                      ey: float, ew: float) -> tuple[bool, bool, bool]:
    """Glasses, hat and beard, drawn at random (no label information)."""
    cx, cy, fw, fh, lw = f.cx, f.cy, f.fw, f.fh, f.lw
    glasses, hat, beard = (bool(rng.uniform() < p) for p in (0.25, 0.2, 0.15))
    if beard:
        d.arc([cx - fw, cy - fh, cx + fw, cy + fh], 20, 160, fill=(60, 40, 30), width=3 * lw)
    if glasses:
        for side in (-1, 1):
            x = cx + side * ex
            d.rectangle([x - 1.4 * ew, ey - 0.16 * fh, x + 1.4 * ew, ey + 0.14 * fh],
                        outline=(20, 20, 20), width=lw)
        d.line([(cx - ex + 1.4 * ew, ey), (cx + ex - 1.4 * ew, ey)], fill=(20, 20, 20), width=lw)
    if hat:
        hat_col = tuple(int(v) for v in rng.integers(0, 255, 3))
        d.rectangle([cx - 1.15 * fw, cy - 1.05 * fh, cx + 1.15 * fw, cy - 0.78 * fh], fill=hat_col)
    return glasses, hat, beard


def _light_and_noise(img: Image.Image, rng: np.random.Generator, size: int
                     ) -> tuple[Image.Image, float, float]:
    """Downsample to ``size``, then a lighting gradient and sensor noise."""
    out = np.asarray(img.resize((size, size), Image.LANCZOS), dtype=np.float64)
    angle, strength = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.35)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    out *= (1 + strength * (np.cos(angle) * xx + np.sin(angle) * yy))[..., None]
    noise = rng.uniform(0, 8)
    out += rng.normal(0, noise, out.shape)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)), strength, noise


def draw_face(label: int, rng: np.random.Generator, size: int, background: int) -> tuple[
        Image.Image, dict]:
    """Draw one ``size x size`` RGB face of class ``label`` on background colour index
    ``background``; return it and the factors drawn (JSON-able)."""
    s = 2 * size  # draw at twice the size, then downsample: cheap anti-aliasing
    cue = _CUES[label] + rng.normal(0, 1, 6) * _CUE_JITTER
    curve, mouth_open, mouth_w, brow_angle, brow_h, eye_open = cue.tolist()
    mouth_open = max(mouth_open, 0.0)
    eye_open = max(eye_open, 0.25)
    img, texture = _canvas(rng, s, background)
    d = ImageDraw.Draw(img)
    t = rng.uniform()
    skin = tuple(int(v) for v in (1 - t) * _SKIN[0] + t * _SKIN[1])
    scale = rng.uniform(0.85, 1.0)
    aspect = rng.uniform(0.72, 0.92)
    cx = s / 2 + rng.uniform(-0.05, 0.05) * s
    cy = s / 2 + rng.uniform(-0.04, 0.04) * s
    fh = 0.46 * s * scale
    # cues are drawn large and thick: they must survive 64 px inputs
    f = _Face(cx, cy, fh * aspect, fh, skin, max(2, round(0.035 * s)))
    d.ellipse([cx - f.fw, cy - fh, cx + f.fw, cy + fh], fill=skin)
    ex, ey, ew = _draw_eyes_brows(d, f, eye_open, brow_angle, brow_h)
    my = _draw_nose_mouth(d, f, rng, label, curve, mouth_open, mouth_w)
    glasses, hat, beard = _draw_accessories(d, f, rng, ex, ey, ew)
    img, strength, noise = _light_and_noise(img, rng, size)
    factors = dict(label=label, background=background, texture=texture, skin=round(t, 4),
                   scale=round(scale, 4), aspect=round(aspect, 4), glasses=glasses, hat=hat,
                   beard=beard, light=round(strength, 4), noise=round(noise, 3),
                   cues=[round(v, 4) for v in (curve, mouth_open, mouth_w, brow_angle, brow_h,
                                                eye_open)],
                   eyes=[[round((cx - ex) / s, 4), round(ey / s, 4)],
                         [round((cx + ex) / s, 4), round(ey / s, 4)]],
                   mouth=[round(cx / s, 4), round(my / s, 4)])
    return img, factors


def _items(params: SynthParams) -> list[tuple[str, str, int, int]]:
    """``(split, name, label, index)`` for every image, classes interleaved."""
    items = []
    for split, per_class in (("train", params.train_per_class), ("test", params.test_per_class)):
        for i in range(per_class * len(CLASSES)):
            items.append((split, f"{split}_{i + 1:05d}", i % len(CLASSES), i))
    return items


def generate(out: str | Path, params: SynthParams,
             progress: Callable[[int, int], None] | None = None) -> Path:
    """Write the dataset under ``out/basic`` (atomically: a temp dir renamed at the end).

    Returns the ``basic`` directory (the RAF-DB root to give the loader).
    """
    out = Path(out)
    final = out / "basic"
    if final.exists():
        raise FileExistsError(f"{final} already exists; choose another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".synth-", dir=out))
    try:
        (tmp / "EmoLabel").mkdir()
        (tmp / "Image" / "aligned").mkdir(parents=True)
        lines, factors = [], []
        items = _items(params)
        for k, (split, name, label, index) in enumerate(items):
            # an independent stream per image: any image can be regenerated alone
            rng = np.random.default_rng([params.seed, 0 if split == "train" else 1, index])
            if split == "train" and params.bias and rng.uniform() < params.bias_strength:
                background = label
            else:
                background = int(rng.integers(len(BACKGROUNDS)))
            img, f = draw_face(label, rng, params.size, background)
            img.save(tmp / "Image" / "aligned" / f"{name}_aligned.jpg", quality=95)
            lines.append(f"{name}.jpg {label + 1}\n")
            factors.append(json.dumps({"name": f"{name}.jpg", "split": split, **f}) + "\n")
            if progress is not None:
                progress(k + 1, len(items))
        (tmp / "EmoLabel" / "list_patition_label.txt").write_text("".join(lines))
        (tmp / "synth_factors.jsonl").write_text("".join(factors))
        (tmp / "synth.json").write_text(json.dumps({"classes": CLASSES, **asdict(params)},
                                                   indent=2))
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "EmoLabel" / "list_patition_label.txt").is_file():
                raise
            # another process generated the same dataset first: identical content, keep it
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def default_cache_dir() -> Path:
    """``$QCS_CACHE``, else ``$XDG_CACHE_HOME/qcs``, else ``~/.cache/qcs``."""
    if os.environ.get("QCS_CACHE"):
        return Path(os.environ["QCS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qcs"


def ensure_synth(params: SynthParams, cache: str | Path | None = None,
                 progress: Callable[[int, int], None] | None = None) -> Path:
    """The built-in dataset for ``params``, generated into the cache on first use."""
    out = Path(cache) if cache else default_cache_dir()
    root = out / params.tag() / "basic"
    if not root.exists():
        generate(out / params.tag(), params, progress)
    return root
