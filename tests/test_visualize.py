"""qcs visualize: CSA maps (shape, cross dependence, batch independence of scope="sample"),
PNG sizes of the quadruplet figure and the class-pair grid, error paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from qcs.cli import main
from qcs.inference import load_model
from qcs.visualize import csa_maps, grid_size, quadruplet_size
from use_helpers import CLASSES, make_checkpoint


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A RAF-DB-layout test split: 2 random 40 px images per class."""
    root = tmp_path_factory.mktemp("vis_data")
    (root / "EmoLabel").mkdir()
    gen = np.random.default_rng(0)
    lines = []
    for i in range(2 * len(CLASSES)):
        name = f"test_{i + 1:05d}.jpg"
        Image.fromarray(gen.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / name)
        lines.append(f"{name} {i % len(CLASSES) + 1}\n")
    (root / "EmoLabel" / "list_patition_label.txt").write_text("".join(lines))
    return root


def _quads(n: int, seed: int) -> torch.Tensor:
    return torch.randn(4, n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_maps_shape_cross_dependence_and_sample_scope(tmp_path):
    m_sample = load_model(make_checkpoint(tmp_path / "s", scope="sample"), full=True).model
    xs = _quads(2, 0)
    maps = csa_maps(m_sample, xs)
    assert maps.shape == (3, 4, 2, 4, 4) and torch.isfinite(maps).all()
    # scope="sample": a quadruplet's maps do not depend on the rest of the batch
    torch.testing.assert_close(csa_maps(m_sample, xs[:, :1]), maps[:, :, :1],
                               atol=1e-5, rtol=0)
    # the anchor's map depends on the other branches (it is a cross similarity)
    other = xs.clone()
    other[2:] = _quads(1, 5)[2:]
    assert (csa_maps(m_sample, other[:, :1])[:, 0] - maps[:, 0, :1]).abs().max() > 1e-4
    # scope="batch": extremes over the batch, so the batch does change the maps
    m_batch = load_model(make_checkpoint(tmp_path / "b", scope="batch"), full=True).model
    both = csa_maps(m_batch, xs)
    assert (csa_maps(m_batch, xs[:, :1]) - both[:, :, :1]).abs().max() > 1e-4


def test_cli_quadruplet_and_grid_png_sizes(tmp_path, dataset):
    ckpt = make_checkpoint(tmp_path / "ck", data_root=str(dataset))
    files = [str(dataset / f"test_{i:05d}.jpg") for i in (1, 8, 2, 9)]
    out = tmp_path / "vis"
    assert main(["visualize", "--checkpoint", str(ckpt), "--out", str(out), "--images", *files,
                 "--tile", "64"]) == 0
    assert Image.open(out / "csa_quadruplet.png").size == quadruplet_size(4, 64)
    assert quadruplet_size(4, 64) == (4 + 4 * 68, 18 + 4 * (64 + 14 + 4) + 4)
    # sampled by class from the dataset recorded in the checkpoint, plus the 7x7 grid
    out2 = tmp_path / "vis2"
    assert main(["visualize", "--checkpoint", str(ckpt), "--out", str(out2), "--grid",
                 "--anchor-class", "happiness", "--negative-class", "anger", "--data", "raf-db",
                 "--grid-tile", "32", "--level", "2"]) == 0
    quad = Image.open(out2 / "csa_quadruplet.png")
    assert quad.size == quadruplet_size(4, 160)
    grid = Image.open(out2 / "csa_class_grid.png")
    assert grid.size == grid_size(7, 32) == (96 + 7 * 36, 18 + 7 * 36)
    a = np.asarray(grid.convert("RGB"), dtype=np.int32)
    cell = a[18:18 + 32, 96:96 + 32]
    assert cell.std() > 5                                   # a heat map was drawn there


def test_cli_dcs_and_errors(tmp_path, dataset, capsys):
    files = [str(dataset / f"test_{i:05d}.jpg") for i in (1, 8, 2, 9)]
    dcs = make_checkpoint(tmp_path / "dcs", variant="dcs")
    assert main(["visualize", "--checkpoint", str(dcs), "--out", str(tmp_path / "d"),
                 "--images", *files[:2], "--tile", "32"]) == 0
    assert Image.open(tmp_path / "d" / "csa_quadruplet.png").size == quadruplet_size(2, 32)
    assert main(["visualize", "--checkpoint", str(dcs), "--out", str(tmp_path / "d"),
                 "--images", *files]) == 2
    assert "takes 2 images" in capsys.readouterr().err
    base = make_checkpoint(tmp_path / "base", variant="baseline")
    assert main(["visualize", "--checkpoint", str(base), "--out", str(tmp_path / "e"),
                 "--images", files[0]]) == 2
    assert "has no cross branch" in capsys.readouterr().err
    qcs = make_checkpoint(tmp_path / "q")                    # no dataset recorded
    assert main(["visualize", "--checkpoint", str(qcs), "--out", str(tmp_path / "f")]) == 2
    assert "--images" in capsys.readouterr().err
    assert main(["visualize", "--checkpoint", str(qcs), "--out", str(tmp_path / "g"),
                 "--data-root", str(dataset), "--data", "raf-db",
                 "--anchor-class", "joy"]) == 2
    assert "'joy' is not a class" in capsys.readouterr().err
