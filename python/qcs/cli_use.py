"""Sub-commands for using a trained model: ``qcs predict``, ``qcs visualize``, ``qcs export``.

Kept apart from :mod:`qcs.cli` so that building the parser stays light (torch, OpenCV and
onnxruntime are imported only by the command that runs).
"""

from __future__ import annotations

import argparse

__all__ = ["add_parsers", "COMMANDS", "MissingDependency", "UsageError"]


class MissingDependency(ImportError):
    """An optional package is not installed (the message says which extra provides it)."""


class UsageError(ValueError):
    """A command-line argument is invalid (the message names it)."""


def _predict_parser(sub) -> None:
    p = sub.add_parser(
        "predict", help="label the facial expressions in images with a trained checkpoint",
        description="Detect faces (OpenCV's bundled Haar cascade; needs the 'predict' extra), "
        "crop them with a margin and classify them with the checkpoint's base network. "
        "Writes one record per face (file, box x/y/w/h, label, per-class probabilities); "
        "images without a face or that cannot be read get one record saying so. Exit status "
        "0 when every input was read, 1 when some could not be, 2 on usage errors.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, directories (searched recursively) or glob patterns "
                   "(quote them; ** allowed)")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="checkpoint (run dir = its best, run/best, run/best.safetensors)")
    p.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    p.add_argument("--format", choices=("json", "jsonl", "csv"),
                   help="output format (default: from --output's suffix, else json)")
    p.add_argument("--no-detect", action="store_true",
                   help="the images are already face crops: classify each whole image")
    p.add_argument("--no-align", action="store_true",
                   help="do not level the crop by the detected eye line")
    p.add_argument("--margin", type=float, default=0.2,
                   help="crop margin per side as a fraction of the face box (default 0.2)")
    p.add_argument("--annotate", metavar="DIR",
                   help="write each image with its face boxes and labels drawn into DIR")
    p.add_argument("--batch-size", type=int, default=32, help="crops per forward pass (32)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    p.add_argument("--threads", type=int, help="torch CPU threads")


def _export_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="export the inference network to ONNX (and torch.export)",
        description="Export the base network of a checkpoint (no cross branch, no CSA op) "
        "with a dynamic batch axis, then run the ONNX file with onnxruntime and report the "
        "largest logit difference against PyTorch. Needs the 'export' extra.")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="checkpoint (run dir = its best, run/best, run/best.safetensors)")
    p.add_argument("--onnx", metavar="OUT.onnx", help="ONNX file to write")
    p.add_argument("--torch-export", metavar="OUT.pt2",
                   help="also save a torch.export program (torch.export.load(OUT).module())")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest accepted logit difference vs PyTorch, times max(1, largest "
                   "|logit|) (default 1e-4)")
    p.add_argument("--threads", type=int, help="torch CPU threads")


def _visualize_parser(sub) -> None:
    p = sub.add_parser(
        "visualize", help="draw the CSA heat maps of a QCS / DCS checkpoint (PNG)",
        description="For one quadruplet (given files, or sampled by class from a dataset) "
        "draw each branch's cross-similarity map at each level over its image "
        "(csa_quadruplet.png), and the anchor maps for every anchor class x negative class "
        "pair (csa_class_grid.png, with --grid).")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="QCS or DCS checkpoint (run dir = its best, run/best, ...)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the PNGs")
    p.add_argument("--images", nargs="+", metavar="FILE",
                   help="anchor, positive, negative, negative-2 images (DCS: anchor, partner); "
                   "default: sampled from the dataset")
    p.add_argument("--anchor-class", metavar="NAME", help="class of the sampled anchor")
    p.add_argument("--negative-class", metavar="NAME",
                   help="class of the sampled negatives (DCS: of the partner)")
    p.add_argument("--grid", action="store_true",
                   help="also draw the class x class grid of anchor maps (needs the dataset)")
    p.add_argument("--level", choices=("1", "2", "3", "mean"), default="mean",
                   help="which level's map the grid shows (default: mean of the three)")
    p.add_argument("--data", metavar="FORMAT",
                   help="dataset layout to sample from (default: the checkpoint's)")
    p.add_argument("--data-root", metavar="DIR",
                   help="dataset root (default: the one recorded in the checkpoint)")
    p.add_argument("--split", default="test", help="split to sample from (default test)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--tile", type=int, default=160,
                   help="pixels per image in the quadruplet figure (default 160)")
    p.add_argument("--grid-tile", type=int, default=96,
                   help="pixels per cell in the class grid (default 96)")
    p.add_argument("--threads", type=int, help="torch CPU threads")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``predict``, ``visualize`` and ``export`` on ``qcs``'s sub-parsers."""
    _predict_parser(sub)
    _visualize_parser(sub)
    _export_parser(sub)


def _run_predict(args) -> int:
    from .predict import run_cli
    return run_cli(args)


def _run_export(args) -> int:
    from .export import run_cli
    return run_cli(args)


def _run_visualize(args) -> int:
    from .visualize import run_cli
    return run_cli(args)


COMMANDS = {"predict": _run_predict, "visualize": _run_visualize, "export": _run_export}
