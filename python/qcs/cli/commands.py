"""The ``qcs`` commands of the trainer: ``train``, ``eval``, ``data synth``, ``convert``,
``config show``. Each takes the parsed arguments and returns the exit status; errors are
raised as :class:`qcs.errors.QCSError` and reported by :func:`qcs.cli.main`."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from ..config import Config, apply_overrides, config_from_dict, load_config, to_toml
from ..errors import DataError, UsageError

__all__ = [
    "apply_args",
    "cmd_config",
    "cmd_convert",
    "cmd_data",
    "cmd_data_landmarks",
    "cmd_eval",
    "cmd_train",
]

log = logging.getLogger("qcs")


def _adopt(cfg: Config, new: Config) -> None:
    """Make ``cfg`` hold ``new``'s sections (callers keep their reference to ``cfg``)."""
    for f in dataclasses.fields(Config):
        setattr(cfg, f.name, getattr(new, f.name))


def _select_model(cfg: Config, args) -> None:
    """``--model`` (a family, or a QCS variant) and ``--variant``."""
    model, variant = getattr(args, "model", None), getattr(args, "variant", None)
    data: dict[str, dict] = {}
    if model in ("qcs", "dcs", "baseline"):
        model, variant = "qcs", variant or model
    if model is not None:
        data["model"] = {"family": model}
    if variant is not None:
        if (model or cfg.model.family) != "qcs":
            raise UsageError(f"--variant {variant}: variants belong to the qcs family, not "
                             f"{model or cfg.model.family}")
        data["qcs"] = {"variant": variant}
    if data:
        _adopt(cfg, config_from_dict(data, "--model/--variant", cfg))


_OPTIONS = [  # (section, key, argument) copied when the argument is given
    ("train", "epochs", "epochs"), ("optim", "lr", "lr"), ("train", "seed", "seed"),
    ("train", "pretrained", "pretrained"), ("train", "max_steps_per_epoch", "max_steps"),
    ("train", "device", "device"), ("train", "amp", "amp"), ("train", "threads", "threads"),
    ("train", "batch_size", "batch_size"), ("data", "num_workers", "workers"),
    ("data", "format", "data"), ("data", "root", "data_root"),
    ("data", "train_list", "train_list"), ("data", "test_list", "test_list"),
    ("data", "image_size", "image_size"), ("data", "cache_in_memory", "cache_in_memory"),
    ("data", "balanced", "balanced"), ("data", "synth_bias_strength", "bias_strength"),
    ("data", "synth_seed", "synth_seed"), ("data", "val_split", "val_split"),
    ("train", "select_on", "select_on"),
]
_FLAGS = [("train", "deterministic", "deterministic"), ("data", "check", "check_data"),
          ("data", "skip_bad", "skip_bad"), ("data", "synth_bias", "bias")]


def apply_args(cfg: Config, args) -> None:
    """Copy the explicit CLI options into ``cfg`` (None means: keep the config's), then
    ``--set`` overrides; validates."""
    _select_model(cfg, args)
    for section, key, name in _OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            setattr(getattr(cfg, section), key, value)
    for section, key, name in _FLAGS:
        if getattr(args, name, False):
            setattr(getattr(cfg, section), key, True)
    if getattr(args, "set", None):
        _adopt(cfg, apply_overrides(cfg, args.set))
    cfg.validate()


def cmd_train(args) -> int:
    """``qcs train``: a fresh run from a preset / file and options, or ``--resume``."""
    from ..tracking import parse_trackers
    from ..training import resolve_device, train
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 alone reports
        log.setLevel(logging.WARNING)
    loggers = parse_trackers(args.logger)
    t0 = time.perf_counter()
    options = dict(cache_dir=args.cache_dir, show_progress=not args.quiet, handle_signals=True,
                   loggers=loggers)
    if args.resume:
        if args.device:
            resolve_device(args.device)  # fail before loading anything
        result = train(load_config("tiny"), ".", resume=args.resume, epochs=args.epochs,
                       **options)
    else:
        default = f"tiny-{args.model}" if args.model in ("dan", "pcd") else "tiny"
        cfg = load_config(args.config or default)
        apply_args(cfg, args)
        resolve_device(cfg.train.device)  # a device that is not there: one line, before work
        name = cfg.family.run_name(cfg.net)
        out = args.out or str(Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}")
        log.info("run directory: %s", out)
        log.debug("resolved config:\n%s", to_toml(cfg))
        result = train(cfg, out, **options)
    minutes = (time.perf_counter() - t0) / 60
    if result.test is not None:  # best.* chosen on validation; the test split seen once
        acc = 100 * result.test["acc"]
        log.info("done in %.1f min: best validation accuracy %.2f%% at epoch %d; its test "
                 "accuracy %.2f%%; checkpoints in %s", minutes, 100 * result.best_acc,
                 result.best_epoch, acc, result.run_dir)
        note = f" (best.*, epoch {result.best_epoch}, chosen on the validation split)"
    else:
        acc = 100 * result.last.get("test_acc", float("nan"))
        log.info("done in %.1f min: final test accuracy %.2f%%, best %.2f%% at epoch %d "
                 "(chosen on the test split); checkpoints in %s", minutes, acc,
                 100 * result.best_acc, result.best_epoch, result.run_dir)
        note = " (last epoch; best.* chosen on the test split)"
    if os.environ.get("RANK", "0") == "0":
        print(f"test accuracy: {acc:.2f}%{note}")  # the result: stdout (logs go to stderr)
    return 0


def _split_dataset(cfg: Config, root: str, split: str):
    """The images of ``split`` (other than ``test``) as a test-transformed dataset."""
    from ..data import ImageDataset, load_split
    from ..data.datasets import screen_images, skip_summary
    from ..training.data import recipe_transforms
    lst = load_split(cfg.data.format, cfg.data.root or root, split, skip_bad=cfg.data.skip_bad)
    if cfg.data.check or cfg.data.skip_bad:
        lst, bad = screen_images(lst, cfg.data.skip_bad)
        if bad and not cfg.data.skip_bad:
            raise DataError(f"{len(bad)} unreadable images:\n  " + "\n  ".join(bad))
    counts, _ = skip_summary([lst])
    if counts:
        log.warning("%s: skipped %s (--skip-bad)", lst.source,
                    ", ".join(f"{n} {reason}" for reason, n in counts.items()))
    return ImageDataset(lst, cfg.data.image_size, recipe_transforms(cfg)[1])


def _print_eval(ev: dict, classes: list[str], base: Path, epoch, images: int, split: str,
                flip_tta: bool) -> None:
    width = max(len(c) for c in classes)
    tta = ", flip TTA (logits of the image and its mirror averaged)" if flip_tta else ""
    print(f"checkpoint {base} (epoch {epoch}), {images} {split} images{tta}")
    print(f"accuracy: {100 * ev['acc']:.2f}%   mean recall: {100 * ev['mean_recall']:.2f}%")
    print(f"{'class':<{width}}  recall      F1")
    for name, r, f in zip(classes, ev["recall"], ev["f1"]):
        print(f"{name:<{width}}  {100 * r:6.2f}  {100 * f:6.2f}")
    print("confusion (rows: true, columns: predicted, order as above):")
    for row in ev["confusion"]:
        print("  " + " ".join(f"{v:5d}" for v in row))


def cmd_eval(args) -> int:
    """``qcs eval``: a checkpoint's inference network on a dataset split."""
    import torch

    from ..inference import load_model
    from ..plots import plot_confusion
    from ..training import evaluate, prepare_data, resolve_device
    device = resolve_device(args.device or "auto")
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.checkpoint)
    cfg, meta, base, classes = loaded.config, loaded.meta, loaded.base, loaded.classes
    if args.data is None and args.data_root is None and meta.get("data_root"):
        cfg.data.root = meta["data_root"]
    apply_args(cfg, args)
    cfg.data.cache_in_memory = False  # each image is read once
    data = prepare_data(cfg, args.cache_dir, show_progress=not args.quiet)
    if list(data.classes) != classes:
        raise DataError(f"the checkpoint's {len(classes)} classes {classes} differ from the "
                        f"dataset's {list(data.classes)} ({cfg.data.format} at {data.root})")
    if args.split == "test":
        test = data.test
    elif args.split in ("val", "valid") and data.val is not None:
        test = data.val  # the run's validation split (official, or its seeded hold-out)
    else:
        test = _split_dataset(cfg, data.root, args.split)
    loader = torch.utils.data.DataLoader(test, batch_size=args.batch_size,
                                         num_workers=cfg.data.num_workers)
    ev = evaluate(loaded.model.to(device), loader, device, len(classes), cfg.train.amp,
                  not args.quiet, flip_tta=args.flip_tta)
    out = Path(args.out) if args.out else base.parent
    out.mkdir(parents=True, exist_ok=True)
    _print_eval(ev, classes, base, meta["epoch"], len(test), args.split, args.flip_tta)
    stem = f"eval_{base.name}_{args.split}" + ("_flip" if args.flip_tta else "")
    (out / f"{stem}.json").write_text(json.dumps({"checkpoint": str(base), "classes": classes,
                                                  "split": args.split,
                                                  "flip_tta": args.flip_tta, **ev}, indent=2))
    plot_confusion(ev["confusion"], classes, out / f"{stem}_confusion.png",
                   f"{base.name} on {args.split}: accuracy {100 * ev['acc']:.2f}%")
    print(f"written: {out / (stem + '.json')}, {out / (stem + '_confusion.png')}")
    return 0


def _landmark_paths(args, split: str) -> list[Path]:
    """The images of ``split`` of the dataset (all images under the root without
    ``--data``)."""
    from ..data.datasets import IMAGE_SUFFIXES, load_split
    if not args.data:
        root = Path(args.data_root)
        if not root.is_dir():
            raise UsageError(f"--data-root {root} is not a directory")
        return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                      and p.is_file() and "landmarks" not in p.relative_to(root).parts)
    return list(load_split(args.data, args.data_root, split).paths)


def _landmark_source_check(args) -> None:
    need = {"raf-manual": ("raf-db",), "affectnet": ("affectnet7", "affectnet8")}
    if args.source in need and args.data not in need[args.source]:
        raise UsageError(f"--source {args.source} needs --data {' or '.join(need[args.source])}"
                         f", got {args.data}")


def cmd_data_landmarks(args) -> int:
    """``qcs data landmarks``: draw PCD's heat maps beside a dataset's images."""
    from ..faces import Detector
    from ..faces.annotations import landmark_items, write_landmark_maps
    from ..logs import Ticker
    _landmark_source_check(args)
    splits = args.split or (["all"] if not args.data else ["train", "valid", "test"]
                            if args.data == "ferplus" else ["train", "test"])
    from ..training import resolve_device
    detector = (Detector(resolve_device(args.device)) if args.source != "affectnet"
                else None)
    official = {"train": "training.csv", "test": "validation.csv"}
    for split in splits:
        paths = _landmark_paths(args, split)
        list_file = args.list_file or (Path(args.data_root) / "Manually_Annotated_file_lists"
                                       / official.get(split, f"{split}.csv"))
        ticker = Ticker(f"landmarks {split}", enabled=not args.quiet)
        written, missing = write_landmark_maps(
            landmark_items(paths, args.source, args.data_root, detector, list_file),
            overwrite=args.overwrite, progress=ticker)
        ticker.close()
        print(f"qcs data landmarks: {split}: {len(paths)} images, {written} maps written, "
              f"{len(missing)} without landmarks" + "".join(f"\n  {p}" for p in missing[:5])
              + ("\n  ..." if len(missing) > 5 else ""))
    return 0


def cmd_data(args) -> int:
    """``qcs data synth``: write the built-in dataset; ``qcs data landmarks``: draw PCD's
    heat maps for a dataset."""
    from ..data.synth import SynthParams, generate
    from ..logs import Ticker
    if args.data_command == "landmarks":
        return cmd_data_landmarks(args)
    if args.data_command != "synth":
        print("qcs data: choose an action (synth, landmarks); see qcs data --help",
              file=sys.stderr)
        return 2
    params = SynthParams(seed=args.seed, train_per_class=args.train_per_class,
                         test_per_class=args.test_per_class, size=args.size, bias=args.bias,
                         bias_strength=args.bias_strength)
    ticker = Ticker("synth", enabled=not args.quiet)
    root = generate(args.out, params, progress=ticker)
    ticker.close()
    print(f"wrote {root} (RAF-DB layout; train with: qcs train --data raf-db --data-root {root})")
    return 0


def cmd_convert(args) -> int:
    """``qcs convert``: an official QCS / DCS checkpoint into ours."""
    import torch

    from ..convert import convert_official
    cfg = load_config(args.config) if args.config else None
    out = Path(args.out)
    base = out / "best" if out.is_dir() or args.out.endswith(("/", "\\")) else out
    torch.manual_seed(args.seed)
    report = convert_official(args.source, base, config=cfg, data_format=args.data,
                              strict=args.strict, overrides=args.set)
    print(report)
    print(f"written: {base}.safetensors, {base}.json (use with qcs eval / predict / "
          f"visualize / export --checkpoint {base})")
    return 0


def cmd_config(args) -> int:
    """``qcs config show``: the resolved config as TOML."""
    if args.config_command != "show":
        print("qcs config: choose an action (show); see qcs config --help", file=sys.stderr)
        return 2
    print(to_toml(load_config(args.name)), end="")
    return 0
