"""``qcs visualize``: the cross-similarity (CSA) maps of a trained QCS / DCS network, as in
the paper's Fig. 5 (maps of each branch at each level over a quadruplet) and Fig. 7 (the
anchor's map for every pair of anchor class x negative class).

Maps come from the cross modules (``CrossSimilarity`` / ``PairSimilarity`` with
``return_maps=True``): one value per token, ``[R, B, side^2]`` at each of the three levels,
reshaped to ``side x side`` and drawn, bilinearly upsampled, over the input image.
Each quadruplet is run as its own batch of one, so with ``csa_scope = "batch"`` the map
normalisation sees that quadruplet only (the same as ``"sample"``).

Images are composed with PIL (no matplotlib figure), so the PNG size is exactly
:func:`quadruplet_size` / :func:`grid_size`. Colours: matplotlib's ``jet`` colormap, each
map stretched to its own min..max (the raw range is printed under the tile).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from .data.datasets import DataError, ImageList, load_split, read_image
from .data.transforms import test_transform
from .errors import UsageError
from .inference import LoadedModel
from .models import QCSNet

__all__ = [
    "BRANCH_NAMES",
    "class_grid_cells",
    "class_pair_grid",
    "csa_maps",
    "grid_size",
    "load_split_for",
    "overlay",
    "quadruplet_figure",
    "quadruplet_size",
    "sample_tuple",
    "tuple_maps",
]

BRANCH_NAMES = {4: ("anchor", "positive", "negative", "negative 2"), 2: ("anchor", "partner")}
CAPTION, HEADER, PAD, LEFT = 14, 18, 4, 96


@torch.no_grad()
def csa_maps(model: QCSNet, xs: torch.Tensor) -> torch.Tensor:
    """CSA maps of each level: ``xs [R, B, 3, S, S]`` (normalised images) ->
    ``[3, R, B, side, side]`` (level, branch, item, token row, token column)."""
    if model.cross is None:
        raise UsageError("the checkpoint is a baseline network: it has no cross branch, so "
                         "there are no CSA maps to show")
    if xs.dim() != 5 or xs.shape[0] != model.branches:
        raise ValueError(f"the {model.variant} network needs [{model.branches}, B, 3, S, S] "
                         f"images, got {tuple(xs.shape)}")
    model.eval()
    r, b = xs.shape[:2]
    _, t = model.vit_base(model.tokens(xs.flatten(0, 1)))
    t = t.view(r, b, *t.shape[1:])
    n = model.tokens_per_level
    side = int(round(n ** 0.5))
    maps = [m(t[:, :, i * n:(i + 1) * n], return_maps=True)[1] for i, m in enumerate(model.cross)]
    return torch.stack(maps).float().view(len(maps), r, b, side, side)


def _colormap():
    from matplotlib import colormaps
    return colormaps["jet"]


def overlay(image: Image.Image, heat: np.ndarray, tile: int, alpha: float = 0.5
            ) -> Image.Image:
    """``image`` resized to ``tile x tile`` with ``heat [h, w]`` (any range; stretched to
    its min..max) upsampled bilinearly and blended over it in ``jet`` colours."""
    heat = np.asarray(heat, dtype=np.float32)
    lo, hi = float(heat.min()), float(heat.max())
    norm = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    up = Image.fromarray(norm, mode="F").resize((tile, tile), Image.BILINEAR)
    rgb = (_colormap()(np.clip(np.asarray(up), 0, 1))[..., :3] * 255).astype(np.uint8)
    base = image.convert("RGB").resize((tile, tile), Image.BILINEAR)
    return Image.blend(base, Image.fromarray(rgb), alpha)


def _text(draw: ImageDraw.ImageDraw, xy, text: str, width: int) -> None:
    """Draw ``text`` cut to fit ``width`` pixels."""
    while text and draw.textlength(text) > width:
        text = text[:-1]
    draw.text(xy, text, fill=(0, 0, 0))


def quadruplet_size(branches: int, tile: int, levels: int = 3) -> tuple[int, int]:
    """``(width, height)`` of :func:`quadruplet_figure`'s image."""
    cols = 1 + levels
    return PAD + cols * (tile + PAD), HEADER + branches * (tile + CAPTION + PAD) + PAD


def quadruplet_figure(images: list[Image.Image], captions: list[str], maps: torch.Tensor,
                      tile: int = 160) -> Image.Image:
    """Rows: the ``R`` branches; columns: the input, then its map at each level.
    ``maps``: ``[L, R, side, side]`` for one quadruplet."""
    levels, r = maps.shape[:2]
    w, h = quadruplet_size(r, tile, levels)
    fig = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(fig)
    names = BRANCH_NAMES.get(r, tuple(f"branch {i}" for i in range(r)))
    for c, title in enumerate(["input"] + [f"CSA level {i + 1}" for i in range(levels)]):
        _text(draw, (PAD + c * (tile + PAD) + 2, 3), title, tile)
    for i in range(r):
        y = HEADER + i * (tile + CAPTION + PAD)
        fig.paste(images[i].convert("RGB").resize((tile, tile), Image.BILINEAR), (PAD, y))
        _text(draw, (PAD + 2, y + tile + 1), f"{names[i]}: {captions[i]}", tile)
        for lv in range(levels):
            m = maps[lv, i].numpy()
            x = PAD + (lv + 1) * (tile + PAD)
            fig.paste(overlay(images[i], m, tile), (x, y))
            _text(draw, (x + 2, y + tile + 1), f"{m.min():.3g}..{m.max():.3g}", tile)
    return fig


def grid_size(classes: int, tile: int) -> tuple[int, int]:
    """``(width, height)`` of :func:`class_pair_grid`'s image."""
    return LEFT + classes * (tile + PAD), HEADER + classes * (tile + PAD)


def class_pair_grid(cells: list[list[tuple[Image.Image, np.ndarray]]], classes: list[str],
                    tile: int = 96, col_title: str = "negative class") -> Image.Image:
    """``K x K`` grid: row ``i`` is the anchor class, column ``j`` the negative (DCS: the
    partner) class; ``cells[i][j] = (anchor image, anchor map [side, side])``."""
    k = len(classes)
    w, h = grid_size(k, tile)
    fig = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(fig)
    _text(draw, (2, 3), f"anchor \\ {col_title.split()[0][:4]}.", LEFT - 4)
    for j, name in enumerate(classes):
        _text(draw, (LEFT + j * (tile + PAD) + 2, 3), name, tile)
    for i, name in enumerate(classes):
        y = HEADER + i * (tile + PAD)
        _text(draw, (2, y + tile // 2 - 6), name, LEFT - 4)
        for j in range(k):
            image, heat = cells[i][j]
            fig.paste(overlay(image, heat, tile), (LEFT + j * (tile + PAD), y))
    return fig


# --------------------------------------------------------------------------- inputs
def _tensor(image: Image.Image, size: int, transform) -> tuple[Image.Image, torch.Tensor]:
    image = image.resize((size, size), Image.BILINEAR) if image.size != (size, size) else image
    return image, transform(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))


def _by_class(images: ImageList) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i, y in enumerate(images.labels):
        out.setdefault(y, []).append(i)
    return out


def _pick(members: dict[int, list[int]], c: int, count: int, rng: np.random.Generator,
          classes: list[str]) -> list[int]:
    pool = members.get(c, [])
    if len(pool) < count:
        raise DataError(f"class {classes[c]!r} has {len(pool)} images in this split; "
                        f"{count} are needed")
    return [pool[i] for i in rng.choice(len(pool), size=count, replace=False)]


def _class_id(name: str, classes: list[str], arg: str) -> int:
    if name in classes:
        return classes.index(name)
    raise UsageError(f"{arg} {name!r} is not a class of the checkpoint "
                     f"({', '.join(classes)})")


def load_split_for(loaded: LoadedModel, data_format: str | None, root: str | None,
                   split: str) -> ImageList:
    """The images of ``split`` to sample tuples from (default: the checkpoint's dataset);
    their classes must be the checkpoint's."""
    fmt = data_format or loaded.config.data.format
    root = root or loaded.meta.get("data_root") or loaded.config.data.root
    if not root:
        raise UsageError("no dataset to sample from: give --images FILE... or --data-root")
    lst = load_split(fmt, root, split)
    if list(lst.classes) != loaded.classes:
        raise DataError(f"the dataset's classes {list(lst.classes)} differ from the "
                        f"checkpoint's {loaded.classes}")
    return lst


def sample_tuple(lst: ImageList, classes: list[str], branches: int, rng: np.random.Generator,
                 anchor: str | None = None, negative: str | None = None
                 ) -> tuple[list[Image.Image], list[str]]:
    """A quadruplet (anchor, positive, two negatives) or pair (anchor, partner) from
    ``lst``: classes by name, or drawn with ``rng``. Returns the images and captions."""
    members = _by_class(lst)
    a = _class_id(anchor, classes, "--anchor-class") if anchor \
        else int(rng.integers(len(classes)))
    others = [c for c in range(len(classes)) if c != a]
    n = _class_id(negative, classes, "--negative-class") if negative \
        else int(rng.choice(others))
    idx = _pick(members, a, 2, rng, classes) + (_pick(members, n, 2, rng, classes)
                                                 if branches == 4 else [])
    if branches == 2 and negative:
        idx = [idx[0], _pick(members, n, 1, rng, classes)[0]]
    pics = [read_image(lst.paths[i]) for i in idx]
    captions = [f"{classes[lst.labels[i]]} ({lst.paths[i].name})" for i in idx]
    return pics, captions


def tuple_maps(model: QCSNet, images: list[Image.Image], size: int
               ) -> tuple[list[Image.Image], torch.Tensor]:
    """The resized images and their CSA maps ``[L, R, side, side]`` (one tuple)."""
    transform = test_transform(size)
    pairs = [_tensor(p, size, transform) for p in images]
    xs = torch.stack([t for _, t in pairs]).unsqueeze(1)           # [R, 1, 3, S, S]
    return [p for p, _ in pairs], csa_maps(model, xs)[:, :, 0]


def class_grid_cells(model: QCSNet, lst: ImageList, classes: list[str], size: int,
                     rng: np.random.Generator, level: int | None, branches: int
                     ) -> list[list[tuple[Image.Image, np.ndarray]]]:
    """For every anchor class x negative (DCS: partner) class, the anchor image and its
    map at ``level`` (None: the mean of the levels), for :func:`class_pair_grid`."""
    members, k, r = _by_class(lst), len(classes), branches
    rows = {c: _pick(members, c, 2, rng, classes) for c in range(k)}   # anchor, positive
    cols = {c: _pick(members, c, 2, rng, classes) for c in range(k)}   # the two negatives
    cells = []
    for i in range(k):
        row = []
        for j in range(k):
            idx = rows[i] + cols[j] if r == 4 else [rows[i][0], cols[j][0]]
            images, m = tuple_maps(model, [read_image(lst.paths[q]) for q in idx], size)
            heat = m[:, 0].mean(0) if level is None else m[level, 0]
            row.append((images[0], heat.numpy()))
        cells.append(row)
    return cells
