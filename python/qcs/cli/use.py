"""The ``qcs`` commands that use a trained model: ``predict``, ``visualize``, ``export``.
Each loads the checkpoint with :func:`qcs.inference.load_model` and calls the library
module of the same name."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path
from typing import Iterable, Iterator

__all__ = ["cmd_export", "cmd_predict", "cmd_visualize"]


def _threads(args) -> None:
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)


def _error_record(arg: str, why: str) -> dict:
    return {"file": arg, "status": "error", "face": None, "box": None, "label": None,
            "confidence": None, "probabilities": None, "notes": [], "message": why}


class _Tally:
    """Passes records through while counting what ``qcs predict`` reports at the end."""

    def __init__(self, records: Iterable[dict]) -> None:
        self.records = records
        self.files: set[str] = set()
        self.no_face: set[str] = set()
        self.faces = 0
        self.errors: list[dict] = []

    def __iter__(self) -> Iterator[dict]:
        for r in self.records:
            self.files.add(r["file"])
            self.faces += r["status"] == "ok"
            if r["status"] == "no_face":
                self.no_face.add(r["file"])
            elif r["status"] == "error":
                self.errors.append(r)
            yield r

    def report(self, output: str | None) -> int:
        """Print the summary to stderr; exit status 1 when some input was unreadable."""
        bad = {r["file"] for r in self.errors}
        print(f"qcs predict: {len(self.files)} inputs, {self.faces} faces classified, "
              f"{len(self.no_face)} without a face, {len(bad)} unreadable"
              + (f"; written to {output}" if output and output != "-" else ""), file=sys.stderr)
        for r in self.errors:
            print(f"qcs predict: {r['file']}: {r['message']}", file=sys.stderr)
        return 1 if bad else 0


def cmd_predict(args) -> int:
    """``qcs predict``: exit 0 when every input was read, 1 when some could not be (they
    are in the output with ``status: error``), 2 on usage errors."""
    from ..api import load_model
    from ..predict import Predictor, collect_inputs, write_records
    from ..training import resolve_device
    _threads(args)
    device = resolve_device(args.device)
    paths, problems = collect_inputs(args.inputs)
    if not paths and problems:
        for arg, why in problems:
            print(f"qcs predict: {arg}: {why}", file=sys.stderr)
        return 2
    loaded = load_model(args.checkpoint, device=str(device))  # a .onnx file: onnxruntime
    predictor = Predictor(loaded, detect=not args.no_detect, margin=args.margin,
                          batch_size=args.batch_size, annotate_dir=args.annotate,
                          align=not args.no_align, device=device,
                          detector=args.detector, template=args.template,
                          flip_tta=args.flip_tta)
    records = _Tally(itertools.chain((_error_record(a, why) for a, why in problems),
                                     predictor.run(paths)))
    out = args.output
    fmt = args.format or ("csv" if out and out.endswith(".csv") else
                          "jsonl" if out and out.endswith(".jsonl") else "json")
    if out and out != "-":
        with open(out, "w", newline="") as fh:
            write_records(records, loaded.classes, fmt, fh)
    else:
        write_records(records, loaded.classes, fmt, sys.stdout)
    return records.report(out)


def _visualize_grid(args, loaded, lst, rng, out: Path) -> None:
    from ..visualize import class_grid_cells, class_pair_grid
    level = None if args.level == "mean" else int(args.level) - 1
    r, k = loaded.branches, len(loaded.classes)
    cells = class_grid_cells(loaded.model, lst, loaded.classes, loaded.image_size, rng, level,
                             r)
    grid = class_pair_grid(cells, loaded.classes, args.grid_tile,
                           "negative class" if r == 4 else "partner class")
    grid_path = out / "csa_class_grid.png"
    grid.save(grid_path)
    print(f"wrote {grid_path} ({grid.width}x{grid.height}): anchor maps "
          f"({'mean of the levels' if level is None else f'level {level + 1}'}), "
          f"{k}x{k} anchor class x {'negative' if r == 4 else 'partner'} class")


def cmd_visualize(args) -> int:
    """``qcs visualize``: the CSA maps of one tuple (and the class grid with ``--grid``)."""
    import numpy as np

    from ..data.datasets import read_image
    from ..errors import UsageError
    from ..inference import load_model
    from ..visualize import (
        BRANCH_NAMES,
        load_split_for,
        quadruplet_figure,
        sample_tuple,
        tuple_maps,
    )
    _threads(args)
    if args.tile < 16:
        raise UsageError(f"--tile must be >= 16 pixels, got {args.tile}")
    loaded = load_model(args.checkpoint, full=True)
    model, classes, r = loaded.model, loaded.classes, loaded.branches
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    lst = None
    if not args.images or args.grid:
        lst = load_split_for(loaded, args.data, args.data_root, args.split)
    if args.images:
        if len(args.images) != r:
            raise UsageError(f"--images: the {loaded.family.run_name(loaded.config.net)} "
                             f"network takes {r} images "
                             f"({', '.join(BRANCH_NAMES[r])}), got {len(args.images)}")
        pics = [read_image(Path(p)) for p in args.images]
        captions = [Path(p).name for p in args.images]
    else:
        pics, captions = sample_tuple(lst, classes, r, rng, args.anchor_class,
                                      args.negative_class)
    images, maps = tuple_maps(model, pics, loaded.image_size)
    fig = quadruplet_figure(images, captions, maps, args.tile)
    quad_path = out / "csa_quadruplet.png"
    fig.save(quad_path)
    print(f"wrote {quad_path} ({fig.width}x{fig.height}): {r} branches x input + "
          f"{maps.shape[0]} levels of {maps.shape[-1]}x{maps.shape[-1]} CSA maps")
    if args.grid:
        _visualize_grid(args, loaded, lst, rng, out)
    return 0


def _check_export_args(args) -> None:
    from ..errors import UsageError
    from ..export import need
    if not args.onnx and not args.torch_export:
        raise UsageError("give --onnx OUT.onnx and/or --torch-export OUT.pt2")
    if args.onnx and not args.onnx.endswith(".onnx"):
        raise UsageError(f"--onnx {args.onnx}: the file name should end in .onnx")
    if args.onnx:  # fail before the (slow) export when a package is missing
        for module in ("onnx", "onnxscript", "onnxruntime"):
            need(module)


def _export_onnx(args, loaded) -> int | None:
    """Write and check the ONNX file: 0 (matches), 1 (above the tolerance), None (the
    conversion failed; reported)."""
    from ..export import ExportError, export_onnx, verify_onnx
    k, s = len(loaded.classes), loaded.image_size
    try:
        path = export_onnx(loaded, args.onnx, opset=args.opset)
    except ExportError as exc:
        print(f"qcs export: error: {exc}" + ("" if args.torch_export else
              "; --torch-export OUT.pt2 may still work"), file=sys.stderr)
        return None
    report = verify_onnx(loaded, path, tolerance=args.tolerance)
    verdict = "OK" if report.ok else f"ABOVE the tolerance {args.tolerance:g}"
    verdict += f"; largest |logit| {report.max_abs_logit:.3g}"
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB): input images "
          f"[batch, {loaded.channels}, {s}, {s}] float32, output logits [batch, {k}] "
          f"for classes {', '.join(loaded.classes)}")
    print(f"onnxruntime vs PyTorch, batches {list(report.batch_sizes)}: largest logit "
          f"difference {report.max_abs_diff:.3g} ({verdict})")
    return 0 if report.ok else 1


def cmd_export(args) -> int:
    """``qcs export``: exit 0 when the export matches PyTorch within ``--tolerance``."""
    from ..export import export_program
    from ..inference import load_model
    _check_export_args(args)
    _threads(args)
    loaded = load_model(args.checkpoint)
    status = _export_onnx(args, loaded) if args.onnx else 0
    if status is None:
        return 1
    if args.torch_export:
        path = export_program(loaded, args.torch_export)
        print(f"wrote {path} (torch.export program; torch.export.load(path).module())")
    if status:
        print(f"qcs export: error: the ONNX model differs from PyTorch by more than "
              f"--tolerance {args.tolerance:g}", file=sys.stderr)
    return status
