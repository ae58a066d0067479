"""The ``qcs`` argument parser: ``train``, ``eval``, ``data synth``, ``convert``,
``config show``, ``predict``, ``visualize``, ``export``. Building it imports nothing heavy
(torch, OpenCV and onnxruntime are imported only by the command that runs)."""

from __future__ import annotations

import argparse

__all__ = ["build_parser"]

_FORMATS = ("raf-db", "ferplus", "affectnet7", "affectnet8", "folder", "synth")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"),
                   help="autocast precision (default: the config's, fp32)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--workers", type=int, help="DataLoader worker processes")
    p.add_argument("--batch-size", type=int, help="items (quadruplets/pairs/images) per step")


def _add_data(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", choices=_FORMATS, metavar="FORMAT",
                   help="dataset layout: " + ", ".join(_FORMATS) + " (default: the config's; "
                   "the tiny preset uses the built-in synth data)")
    g.add_argument("--data-root", metavar="DIR",
                   help="dataset root (RAF-DB: the 'basic' dir; FERPlus: the dir holding "
                   "FER2013Train/Valid/Test; AffectNet: the dir holding Manually_Annotated_*; "
                   "folder: root/<train|test>/<class>/*.jpg)")
    g.add_argument("--train-list", metavar="FILE",
                   help="train label file, relative to the root (overrides the layout's)")
    g.add_argument("--test-list", metavar="FILE", help="test label file, relative to the root")
    g.add_argument("--image-size", type=int, help="input size in pixels (paper: 224)")
    g.add_argument("--check-data", action="store_true",
                   help="open every image at start-up and report all unreadable ones by name")
    g.add_argument("--skip-bad", action="store_true",
                   help="leave out malformed list lines, labels out of range and unreadable "
                   "images (all images are decoded at start-up), allow empty classes, and "
                   "print how many were skipped for which reason")
    g.add_argument("--cache-in-memory", action=argparse.BooleanOptionalAction, default=None,
                   help="decode every image once and keep it in RAM")
    g.add_argument("--balanced", action=argparse.BooleanOptionalAction, default=None,
                   help="class-balanced anchor sampling (default: on for AffectNet only)")
    g.add_argument("--bias", action="store_true",
                   help="built-in data: tie the background colour to the class in the "
                   "training split only")
    g.add_argument("--bias-strength", type=float,
                   help="built-in data: probability that a biased training image carries its "
                   "class colour (default 0.9)")
    g.add_argument("--synth-seed", type=int, help="built-in data: generator seed")
    g.add_argument("--val-split", metavar="none|official|FRACTION",
                   help="validation split: FERPlus's official one, or a seeded, stratified "
                   "hold-out of the training list (e.g. 0.1); best.* is then chosen on it "
                   "and the test split is evaluated once, at the end")
    g.add_argument("--cache-dir", metavar="DIR",
                   help="where built-in data is cached (default $QCS_CACHE, else "
                   "$XDG_CACHE_HOME/qcs or ~/.cache/qcs)")


class _VersionAction(argparse.Action):
    """``--version``: like argparse's, but the text (which imports torch) is made only
    when the option is given."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from ..about import version_text
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``qcs`` command and its sub-commands."""
    parser = argparse.ArgumentParser(
        prog="qcs", description="Train and evaluate QCS / DCS / baseline facial expression "
        "recognition networks (Quadruplet Cross Similarity, AAAI 2025).")
    parser.add_argument("--version", action=_VersionAction,
                        help="print the versions of qcs-ext, Python, torch and the native "
                        "kernels, and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_train_parser, _eval_parser, _data_parser, _convert_parser, _config_parser,
                _predict_parser, _visualize_parser, _export_parser):
        add(sub)
    for leaf in _leaves(parser):
        _add_verbosity(leaf)
    return parser


def _leaves(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers of the commands that run (``train``, ``data synth``, ...)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [parser]
    return [leaf for a in subs for p in a.choices.values() for leaf in _leaves(p)]


def _add_verbosity(p: argparse.ArgumentParser) -> None:
    """``-q`` / ``-v``: messages go to stderr through the ``qcs`` logger (stdout keeps the
    command's result)."""
    p.add_argument("-q", "--quiet", action="store_true",
                   help="warnings and errors only, no progress bars")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="also debug messages (the resolved config, ...)")


def _train_parser(sub) -> None:
    t = sub.add_parser("train", help="train a network (default: tiny QCS on the built-in data)",
                       description="Train a network. With no dataset, the built-in data is "
                       "generated (cached) and the tiny QCS preset is trained on it.")
    t.add_argument("--config", default=None, metavar="NAME|FILE",
                   help="preset (tiny, paper-qcs, paper-dcs, paper-baseline, tiny-dan, "
                   "tiny-pcd, paper-dan, paper-pcd) or TOML file (default: tiny)")
    t.add_argument("--model", choices=("qcs", "dcs", "baseline", "dan", "pcd"),
                   help="network: the QCS family (qcs, dcs, baseline) or DAN / PCD (default "
                   "config for dan / pcd: the tiny-dan / tiny-pcd preset)")
    t.add_argument("--variant", choices=("qcs", "dcs", "baseline"),
                   help="QCS-family variant (same as --model qcs|dcs|baseline)")
    t.add_argument("--epochs", type=int, help="number of epochs")
    t.add_argument("--lr", type=float, help="learning rate")
    t.add_argument("--seed", type=int, help="seed of everything random (default 0)")
    t.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels: two runs give identical weights")
    t.add_argument("--pretrained", metavar="FILE",
                   help="IR50 weights (.pth read with weights_only=True, or .safetensors)")
    t.add_argument("--out", metavar="DIR",
                   help="run directory (default runs/<time>-<variant> under the current dir)")
    t.add_argument("--resume", metavar="RUN|CHECKPOINT",
                   help="continue a run from its last checkpoint (a run dir or a checkpoint)")
    t.add_argument("--max-steps", type=int, help="cap on steps per epoch (quick runs)")
    t.add_argument("--select-on", choices=("auto", "val", "test"),
                   help="split that picks best.*: auto (validation when there is one, else "
                   "test), val, or test (as the paper's scripts do; an optimistic estimate)")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config field, e.g. --set qcs.dropout=0.3 (repeatable)")
    t.add_argument("--logger", default="csv", metavar="NAME[,NAME]",
                   help="experiment trackers, comma-separated: csv (steps.csv, metrics.csv), "
                   "tensorboard (RUN/tensorboard), wandb (RUN/wandb; WANDB_MODE=offline keeps "
                   "it local), or none (default: csv); metrics.jsonl is always written")
    _add_common(t)
    _add_data(t)


EVAL_FILES = ("OUT/eval_<checkpoint>_<split>.json (accuracy, mean recall, per-class recall "
              "and F1, confusion matrix) and OUT/eval_<checkpoint>_<split>_confusion.png, "
              "<checkpoint> being the checkpoint's name (best, last)")


def _eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a checkpoint's inference network on a split",
                       description="Accuracy, mean recall, per-class recall and F1 and the "
                       "confusion matrix of a checkpoint's inference network on a split of "
                       f"its dataset (or another with the same classes). Prints them and writes "
                       f"{EVAL_FILES}.")
    e.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="checkpoint (run/best, run/best.safetensors or a run dir = its best)")
    e.add_argument("--split", default="test",
                   help="split to evaluate: test (default), val (the checkpoint's validation "
                   "split: FERPlus's official one or its seeded hold-out), train, valid")
    e.add_argument("--flip-tta", action="store_true",
                   help="test-time augmentation: average the logits of each image and of its "
                   "mirror image")
    e.add_argument("--out", metavar="OUT",
                   help="directory for eval_<checkpoint>_<split>.json and "
                   "eval_<checkpoint>_<split>_confusion.png (default: the checkpoint's)")
    e.add_argument("--device", default="auto",
                   help="auto (default: CUDA when available), cpu, cuda, cuda:N")
    e.add_argument("--amp", choices=("none", "bf16", "fp16"),
                   help="autocast precision (default: the checkpoint config's)")
    e.add_argument("--batch-size", type=int, default=64, help="images per forward pass (64)")
    e.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    e.add_argument("--workers", type=int, help="DataLoader worker processes")
    g = e.add_argument_group("data (default: the dataset the checkpoint was trained on)")
    g.add_argument("--data", choices=_FORMATS, metavar="FORMAT",
                   help="dataset layout: " + ", ".join(_FORMATS))
    g.add_argument("--data-root", metavar="DIR", help="dataset root (see qcs train --help)")
    g.add_argument("--test-list", metavar="FILE", help="test label file, relative to the root")
    g.add_argument("--check-data", action="store_true",
                   help="open every image first and report all unreadable ones by name")
    g.add_argument("--skip-bad", action="store_true",
                   help="leave out unreadable images and malformed list lines (counted)")
    g.add_argument("--cache-dir", metavar="DIR",
                   help="where built-in data is cached (default $QCS_CACHE, else "
                   "$XDG_CACHE_HOME/qcs or ~/.cache/qcs)")


def _data_parser(sub) -> None:
    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION")
    s = dsub.add_parser("synth", help="write the built-in synthetic dataset in RAF-DB layout",
                        description="Procedurally drawn facial expressions (7 RAF-DB classes) "
                        "with label-free nuisance factors, deterministic from the seed.")
    s.add_argument("--out", required=True, metavar="DIR", help="output directory (gets basic/)")
    s.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    s.add_argument("--train-per-class", type=int, default=300, help="default 300")
    s.add_argument("--test-per-class", type=int, default=100, help="default 100")
    s.add_argument("--size", type=int, default=100, help="image side in px (default 100)")
    s.add_argument("--bias", action="store_true",
                   help="tie the background colour to the class in the training split only")
    s.add_argument("--bias-strength", type=float, default=0.9,
                   help="probability a biased training image gets its class colour (0.9)")
    _landmarks_parser(dsub)


def _landmarks_parser(dsub) -> None:
    lm = dsub.add_parser(
        "landmarks", help="draw PCD's eye / mouth heat maps for a dataset from five landmarks",
        description="Write DIR/landmarks/NAME.png beside every image of a dataset (the maps "
        "PCD reads with pcd.landmarks=\"heatmap\"), from RAF-DB's manual five points "
        "(basic/Annotation/manual), AffectNet's facial_landmarks column, or the face "
        "detector.")
    lm.add_argument("--data", choices=_FORMATS[:-1], metavar="FORMAT",
                    help=f"dataset layout ({', '.join(_FORMATS[:-1])}); without it every image "
                    "under --data-root")
    lm.add_argument("--data-root", required=True, metavar="DIR", help="dataset root")
    lm.add_argument("--source", choices=("raf-manual", "affectnet", "detect"),
                    default="detect", help="where the landmarks come from (default detect)")
    lm.add_argument("--split", action="append", metavar="SPLIT",
                    help="split(s) to draw (default: train and test; FERPlus also valid)")
    lm.add_argument("--list-file", metavar="CSV",
                    help="--source affectnet: the list CSV with facial_landmarks (default: "
                    "the split's official list)")
    lm.add_argument("--overwrite", action="store_true", help="redraw existing maps")
    lm.add_argument("--device", default="auto",
                    help="detector device: auto (default: CUDA when available), cpu, cuda:N")


def _convert_parser(sub) -> None:
    v = sub.add_parser("convert", help="import an official QCS / DCS checkpoint (.pth)",
                       description="Read a checkpoint published with the QCS paper "
                       "(github.com/birdwcp/QCS: torch.save of state_dict, optimizer and "
                       "recorder objects) without running code from it, rename its weights "
                       "onto our network and write our safetensors checkpoint OUT "
                       "(OUT.safetensors + OUT.json; a directory gets OUT/best). The network's "
                       "variant and class count come from the file, its shape from --config.")
    v.add_argument("source", metavar="IN", help="the official .pth / .pth.tar file")
    v.add_argument("out", metavar="OUT", help="checkpoint to write (base name or directory)")
    v.add_argument("--config", default=None, metavar="NAME|FILE",
                   help="preset or TOML file giving the network's shape and the evaluation "
                   "transform (default: the preset of the authors' script for the file's "
                   "network and --data, e.g. paper-qcs-affectnet7)")
    v.add_argument("--data", choices=("raf-db", "ferplus", "affectnet7", "affectnet8"),
                   help="dataset whose class order the labels follow (default raf-db for 7 "
                   "classes; required for 8)")
    v.add_argument("--strict", action=argparse.BooleanOptionalAction, default=True,
                   help="refuse missing or unexpected weights (default); --no-strict keeps "
                   "missing ones at initialisation and ignores unexpected ones, listing both")
    v.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config field, e.g. --set qcs.csa_scope=sample")
    v.add_argument("--seed", type=int, default=0,
                   help="seed of the initialisation of weights the file lacks (--no-strict)")


def _config_parser(sub) -> None:
    c = sub.add_parser("config", help="show a preset or config file")
    csub = c.add_subparsers(dest="config_command", metavar="ACTION")
    cs = csub.add_parser("show", help="print the resolved config as TOML")
    cs.add_argument("name", nargs="?", default="tiny", help="preset name or TOML file")



def _predict_parser(sub) -> None:
    p = sub.add_parser(
        "predict", help="label the facial expressions in images with a trained checkpoint",
        description="Detect faces with five landmarks (MTCNN, weights shipped with the "
        "package), warp each onto the layout of the checkpoint's training data and classify "
        "it with the checkpoint's network (heat-map PCD networks get the maps drawn from the "
        "landmarks). Writes one record per face (file, box x/y/w/h, five landmarks, label, "
        "per-class probabilities); "
        "images without a face or that cannot be read get one record saying so. Exit status "
        "0 when every input was read, 1 when some could not be, 2 on usage errors.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files, directories (searched recursively) or glob patterns "
                   "(quote them; ** allowed)")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="checkpoint (run dir = its best, run/best, run/best.safetensors), or "
                   "a .onnx file written by qcs export (run with onnxruntime)")
    p.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    p.add_argument("--format", choices=("json", "jsonl", "csv"),
                   help="output format (default: from --output's suffix, else json)")
    p.add_argument("--no-detect", action="store_true",
                   help="the images are already face crops: classify each whole image")
    p.add_argument("--no-align", action="store_true",
                   help="crop the square face box with --margin instead of warping the five "
                   "landmarks onto the training data's template")
    p.add_argument("--margin", type=float, default=0.2,
                   help="box-crop margin per side as a fraction of the face box (default 0.2)")
    p.add_argument("--detector", choices=("mtcnn", "haar"), default="mtcnn",
                   help="mtcnn (default: five landmarks, no extra package) or haar (OpenCV's "
                   "cascade, boxes only; needs opencv-python-headless<5)")
    p.add_argument("--template", choices=("raf-db", "box"),
                   help="alignment template (default: the one of the checkpoint's data format)")
    p.add_argument("--annotate", metavar="DIR",
                   help="write each image with its face boxes and labels drawn into DIR")
    p.add_argument("--batch-size", type=int, default=32,
                   help="images per detector call and crops per forward pass (32)")
    p.add_argument("--flip-tta", action="store_true",
                   help="test-time augmentation: average the logits of each face and of its "
                   "mirror image")
    p.add_argument("--device", default="auto",
                   help="auto (default: CUDA when available), cpu, cuda, cuda:N")
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
