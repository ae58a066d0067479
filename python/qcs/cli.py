"""The ``qcs`` command: ``train``, ``eval``, ``data synth``, ``convert``, ``config show``.

``qcs train`` with no arguments generates the built-in data (once, cached) and trains the
``tiny`` QCS preset on it, printing the test accuracy.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

__all__ = ["main", "build_parser"]

log = logging.getLogger("qcs")

_FORMATS = ("raf-db", "ferplus", "affectnet7", "affectnet8", "folder", "synth")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"),
                   help="autocast precision (default: the config's, fp32)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--workers", type=int, help="DataLoader worker processes")
    p.add_argument("--batch-size", type=int, help="items (quadruplets/pairs/images) per step")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


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
    g.add_argument("--cache-dir", metavar="DIR",
                   help="where built-in data is cached (default $QCS_CACHE, else "
                   "$XDG_CACHE_HOME/qcs or ~/.cache/qcs)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qcs", description="Train and evaluate QCS / DCS / baseline facial expression "
        "recognition networks (Quadruplet Cross Similarity, AAAI 2025).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

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
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config field, e.g. --set model.dropout=0.3 (repeatable)")
    _add_common(t)
    _add_data(t)

    e = sub.add_parser("eval", help="evaluate a checkpoint (base network only)",
                       description="Accuracy, per-class recall and F1, confusion matrix "
                       "(printed and saved as PNG) of a checkpoint on a dataset's test split.")
    e.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="checkpoint (run/best, run/best.safetensors or a run dir = its best)")
    e.add_argument("--split", default="test", help="split to evaluate (default test)")
    e.add_argument("--out", metavar="DIR", help="where to write eval.json and the confusion "
                   "PNG (default: beside the checkpoint)")
    _add_common(e)
    _add_data(e)

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
    s.add_argument("--quiet", action="store_true", help="no progress bar")

    v = sub.add_parser("convert", help="import an official QCS / DCS checkpoint (.pth)",
                       description="Read a checkpoint published with the QCS paper "
                       "(github.com/birdwcp/QCS: torch.save of state_dict, optimizer and "
                       "recorder objects) without running code from it, rename its weights "
                       "onto our network and write our safetensors checkpoint OUT "
                       "(OUT.safetensors + OUT.json; a directory gets OUT/best). The network's "
                       "variant and class count come from the file, its shape from --config.")
    v.add_argument("source", metavar="IN", help="the official .pth / .pth.tar file")
    v.add_argument("out", metavar="OUT", help="checkpoint to write (base name or directory)")
    v.add_argument("--config", default="paper-qcs", metavar="NAME|FILE",
                   help="preset or TOML file giving the network's shape (default paper-qcs)")
    v.add_argument("--data", choices=("raf-db", "ferplus", "affectnet7", "affectnet8"),
                   help="dataset whose class order the labels follow (default raf-db for 7 "
                   "classes; required for 8)")
    v.add_argument("--strict", action=argparse.BooleanOptionalAction, default=True,
                   help="refuse missing or unexpected weights (default); --no-strict keeps "
                   "missing ones at initialisation and ignores unexpected ones, listing both")
    v.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config field, e.g. --set model.csa_scope=sample")
    v.add_argument("--seed", type=int, default=0,
                   help="seed of the initialisation of weights the file lacks (--no-strict)")

    c = sub.add_parser("config", help="show a preset or config file")
    csub = c.add_subparsers(dest="config_command", metavar="ACTION")
    cs = csub.add_parser("show", help="print the resolved config as TOML")
    cs.add_argument("name", nargs="?", default="tiny", help="preset name or TOML file")
    from .cli_use import add_parsers
    add_parsers(sub)  # predict, visualize, export
    return parser


def _apply_args(cfg, args) -> None:
    """Copy the explicit CLI options into ``cfg`` (None means: keep the config's)."""
    from .config import apply_overrides
    model = getattr(args, "model", None)
    if model in ("dan", "pcd"):
        cfg.model.family = model
    elif model is not None:
        cfg.model.family, cfg.model.variant = "qcs", model
    pairs = [
        ("model", "variant", getattr(args, "variant", None)),
        ("train", "epochs", getattr(args, "epochs", None)),
        ("optim", "lr", getattr(args, "lr", None)),
        ("train", "seed", getattr(args, "seed", None)),
        ("train", "pretrained", getattr(args, "pretrained", None)),
        ("train", "max_steps_per_epoch", getattr(args, "max_steps", None)),
        ("train", "device", args.device), ("train", "amp", args.amp),
        ("train", "threads", args.threads), ("train", "batch_size", args.batch_size),
        ("data", "num_workers", args.workers), ("data", "format", args.data),
        ("data", "root", args.data_root), ("data", "train_list", args.train_list),
        ("data", "test_list", args.test_list), ("data", "image_size", args.image_size),
        ("data", "cache_in_memory", args.cache_in_memory), ("data", "balanced", args.balanced),
        ("data", "synth_bias_strength", args.bias_strength),
        ("data", "synth_seed", args.synth_seed),
    ]
    for section, key, value in pairs:
        if value is not None:
            setattr(getattr(cfg, section), key, value)
    if getattr(args, "deterministic", False):
        cfg.train.deterministic = True
    if args.check_data:
        cfg.data.check = True
    if args.skip_bad:
        cfg.data.skip_bad = True
    if args.bias:
        cfg.data.synth_bias = True
    if getattr(args, "set", None):
        new = apply_overrides(cfg, args.set)
        for name in ("model", "data", "optim", "loss", "train"):
            setattr(cfg, name, getattr(new, name))
    cfg.validate()


def _setup_logging(quiet: bool) -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def _cmd_train(args) -> int:
    from .config import load_config
    from .train import train
    _setup_logging(args.quiet)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 alone reports
        log.setLevel(logging.WARNING)
    t0 = time.perf_counter()
    if args.resume:
        result = train(load_config("tiny"), ".", resume=args.resume, cache_dir=args.cache_dir,
                       show_progress=not args.quiet, epochs=args.epochs)
    else:
        default = f"tiny-{args.model}" if args.model in ("dan", "pcd") else "tiny"
        cfg = load_config(args.config or default)
        _apply_args(cfg, args)
        name = cfg.model.variant if cfg.model.family == "qcs" else cfg.model.family
        out = args.out or str(Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}")
        log.info("run directory: %s", out)
        result = train(cfg, out, cache_dir=args.cache_dir, show_progress=not args.quiet)
    log.info("done in %.1f min: final test accuracy %.2f%%, best %.2f%% at epoch %d; "
             "checkpoints in %s", (time.perf_counter() - t0) / 60,
             100 * result.last.get("test_acc", float("nan")), 100 * result.best_acc,
             result.best_epoch, result.run_dir)
    if log.isEnabledFor(logging.INFO):
        print(f"test accuracy: {100 * result.last.get('test_acc', float('nan')):.2f}%")
    return 0


def _cmd_eval(args) -> int:
    import torch

    from .checkpoint import checkpoint_base, load_weights, read_metadata
    from .config import config_from_dict
    from .models import build_model
    from .plots import plot_confusion
    from .train import _fix_none, evaluate, prepare_data, resolve_device
    _setup_logging(args.quiet)
    path = Path(args.checkpoint)
    base = path / "best" if path.is_dir() else checkpoint_base(path)
    meta = read_metadata(base)
    cfg = config_from_dict(_fix_none(meta["config"]), f"{base}.json").validate()
    if args.data is None and args.data_root is None and meta.get("data_root"):
        cfg.data.root = meta["data_root"]
    args.pretrained = None
    _apply_args(cfg, args)
    cfg.data.cache_in_memory = bool(args.cache_in_memory)
    classes = meta["classes"]
    data = prepare_data(cfg, args.cache_dir, show_progress=not args.quiet)
    if list(data.classes) != classes:
        raise SystemExit(f"qcs eval: the checkpoint's classes {classes} differ from the "
                         f"dataset's {list(data.classes)}")
    if args.split != "test":
        from .data import DataError, ImageDataset, load_split, test_transform
        from .data.datasets import screen_images, skip_summary
        lst = load_split(cfg.data.format, cfg.data.root or data.root, args.split,
                         skip_bad=cfg.data.skip_bad)
        if cfg.data.check or cfg.data.skip_bad:
            lst, bad = screen_images(lst, cfg.data.skip_bad)
            if bad and not cfg.data.skip_bad:
                raise DataError(f"{len(bad)} unreadable images:\n  " + "\n  ".join(bad))
        counts, _ = skip_summary([lst])
        if counts:
            log.warning("%s: skipped %s (--skip-bad)", lst.source,
                        ", ".join(f"{n} {reason}" for reason, n in counts.items()))
        data.test = ImageDataset(lst, cfg.data.image_size, test_transform(cfg.data.image_size))
    cfg.model.variant = "baseline"  # inference needs the base network only
    model = build_model(cfg.model)
    weights = {k: v for k, v in load_weights(base, meta["epoch"]).items()
               if not k.startswith(("cross.", "vit_cross."))}
    model.load_state_dict(weights)
    device = resolve_device(cfg.train.device)
    model.to(device)
    loader = torch.utils.data.DataLoader(data.test, batch_size=cfg.train.batch_size * 4,
                                         num_workers=cfg.data.num_workers)
    ev = evaluate(model, loader, device, len(classes), cfg.train.amp, not args.quiet)
    out = Path(args.out) if args.out else base.parent
    out.mkdir(parents=True, exist_ok=True)
    width = max(len(c) for c in classes)
    print(f"checkpoint {base} (epoch {meta['epoch']}), {len(data.test)} {args.split} images")
    print(f"accuracy: {100 * ev['acc']:.2f}%   mean recall: {100 * ev['mean_recall']:.2f}%")
    print(f"{'class':<{width}}  recall      F1")
    for name, r, f in zip(classes, ev["recall"], ev["f1"]):
        print(f"{name:<{width}}  {100 * r:6.2f}  {100 * f:6.2f}")
    print("confusion (rows: true, columns: predicted, order as above):")
    for row in ev["confusion"]:
        print("  " + " ".join(f"{v:5d}" for v in row))
    stem = f"eval_{base.name}_{args.split}"
    (out / f"{stem}.json").write_text(json.dumps({"checkpoint": str(base), "classes": classes,
                                                  **ev}, indent=2))
    plot_confusion(ev["confusion"], classes, out / f"{stem}_confusion.png",
                   f"{base.name} on {args.split}: accuracy {100 * ev['acc']:.2f}%")
    print(f"written: {out / (stem + '.json')}, {out / (stem + '_confusion.png')}")
    return 0


def _cmd_data(args) -> int:
    from .data.synth import SynthParams, generate
    from .progress import Progress
    if args.data_command != "synth":
        print("qcs data: choose an action (synth); see qcs data --help", file=sys.stderr)
        return 2
    params = SynthParams(seed=args.seed, train_per_class=args.train_per_class,
                         test_per_class=args.test_per_class, size=args.size, bias=args.bias,
                         bias_strength=args.bias_strength)
    bar = Progress(1, "synth", unit="img", enabled=not args.quiet)

    def tick(done: int, total: int) -> None:
        bar.total = total
        bar.update(done, items=1)
    root = generate(args.out, params, progress=tick)
    bar.close()
    print(f"wrote {root} (RAF-DB layout; train with: qcs train --data raf-db --data-root {root})")
    return 0


def _cmd_convert(args) -> int:
    import torch

    from .config import apply_overrides, load_config
    from .convert import convert_official
    cfg = apply_overrides(load_config(args.config), args.set)
    out = Path(args.out)
    base = out / "best" if out.is_dir() or args.out.endswith(("/", "\\")) else out
    torch.manual_seed(args.seed)
    report = convert_official(args.source, base, config=cfg, data_format=args.data,
                              strict=args.strict)
    print(report)
    print(f"written: {base}.safetensors, {base}.json (use with qcs eval / predict / "
          f"visualize / export --checkpoint {base})")
    return 0


def _cmd_config(args) -> int:
    from .config import load_config, to_toml
    if args.config_command != "show":
        print("qcs config: choose an action (show); see qcs config --help", file=sys.stderr)
        return 2
    print(to_toml(load_config(args.name)), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``qcs`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .convert import ConvertError
    from .data import DataError
    from .cli_use import COMMANDS, MissingDependency, UsageError
    try:
        return {"train": _cmd_train, "eval": _cmd_eval, "data": _cmd_data,
                "convert": _cmd_convert, "config": _cmd_config, **COMMANDS}[args.command](args)
    except (ConfigError, DataError, CheckpointError, ConvertError, FileNotFoundError,
            FileExistsError, MissingDependency, UsageError) as exc:
        print(f"qcs {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # train: SIGINT / SIGTERM after saving (exit_code)
        print(f"qcs {args.command}: {exc or 'interrupted'}", file=sys.stderr)
        return getattr(exc, "exit_code", 130)
