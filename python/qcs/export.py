"""``qcs export``: the inference network of a checkpoint as ONNX (and optionally as a
``torch.export`` program).

Only the base network is exported (backbone, level embeddings, ViT_base): the cross branch
and its CSA op are training-time only, so the exported graph holds standard ONNX ops and
runs anywhere onnxruntime does. Input ``images``: float32 ``[batch, C, S, S]`` normalised
with the ImageNet mean / std (``C = 3``; a PCD network on landmark heat maps takes them as
extra channels; ``S`` = the checkpoint's ``data.image_size``); output ``logits``:
``[batch, K]``. The batch axis is dynamic.

After writing, the file is checked with ``onnx.checker`` and run with onnxruntime on seeded
inputs at two batch sizes; the largest absolute logit difference against PyTorch is
reported and must be at most ``tolerance * max(1, largest |logit|)`` (absolute for the
usual logits of a few units, relative for networks with large logits).
Needs ``pip install 'qcs-ext[export]'``
(onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .cli_use import MissingDependency, UsageError
from .inference import LoadedModel

__all__ = ["export_onnx", "verify_onnx", "export_program", "ExportReport", "run_cli"]


@dataclass
class ExportReport:
    path: Path
    batch_sizes: tuple[int, ...]
    max_abs_diff: float
    tolerance: float
    max_abs_logit: float = 0.0

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance * max(1.0, self.max_abs_logit)


class ExportError(RuntimeError):
    """The exporter could not convert the network (the message says what failed)."""


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise MissingDependency(f"ONNX export needs {module}: pip install 'qcs-ext[export]' "
                                "(onnx, onnxscript, onnxruntime)") from None


def export_onnx(loaded: LoadedModel, out: str | Path, opset: int = 18) -> Path:
    """Write the base network of ``loaded`` to ``out`` (one self-contained ``.onnx`` file)
    with a dynamic batch axis, via the ``torch.export``-based exporter."""
    _need("onnxscript")
    onnx = _need("onnx")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = loaded.model.eval().cpu()
    s = loaded.image_size
    example = torch.zeros(2, loaded.channels, s, s)
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        program = torch.onnx.export(
            model, (example,), dynamo=True, input_names=["images"], output_names=["logits"],
            dynamic_shapes=({0: batch},), opset_version=opset, verbose=False)
    except Exception as exc:  # the exporter raises many types; keep the first cause
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        raise ExportError(f"ONNX conversion of the {type(model).__name__} network failed: "
                          f"{type(cause).__name__}: {first}") from exc
    program.save(str(out), external_data=False)
    onnx.checker.check_model(str(out), full_check=True)
    return out


@torch.no_grad()
def verify_onnx(loaded: LoadedModel, path: str | Path, batch_sizes: tuple[int, ...] = (1, 5),
                tolerance: float = 1e-4, seed: int = 0) -> ExportReport:
    """Run ``path`` with onnxruntime (CPU) and the PyTorch model on the same seeded
    inputs ``[b, 3, S, S]`` for each ``b`` in ``batch_sizes``; report the largest absolute
    logit difference."""
    ort = _need("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed)
    model = loaded.model.eval().cpu()
    s = loaded.image_size
    worst, scale = 0.0, 0.0
    for b in batch_sizes:
        x = torch.randn(b, loaded.channels, s, s, generator=gen)
        ref = model(x)
        (got,) = session.run(["logits"], {"images": x.numpy()})
        if tuple(got.shape) != tuple(ref.shape):
            raise RuntimeError(f"{path}: onnxruntime returned logits of shape {got.shape} for "
                               f"batch {b}, PyTorch {tuple(ref.shape)}")
        worst = max(worst, float((torch.from_numpy(got) - ref).abs().max()))
        scale = max(scale, float(ref.abs().max()))
    return ExportReport(Path(path), tuple(batch_sizes), worst, tolerance, scale)


def export_program(loaded: LoadedModel, out: str | Path) -> Path:
    """Save the base network as a ``torch.export`` program (``.pt2``, dynamic batch axis);
    load it with ``torch.export.load(path).module()``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    s = loaded.image_size
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(loaded.model.eval().cpu(),
                                  (torch.zeros(2, loaded.channels, s, s),),
                                  dynamic_shapes=({0: batch},))
    torch.export.save(program, str(out))
    return out


def run_cli(args) -> int:
    """``qcs export``: exit 0 when the export matches PyTorch within ``--tolerance``."""
    from .inference import load_model
    if not args.onnx and not args.torch_export:
        raise UsageError("give --onnx OUT.onnx and/or --torch-export OUT.pt2")
    if args.onnx and not args.onnx.endswith(".onnx"):
        raise UsageError(f"--onnx {args.onnx}: the file name should end in .onnx")
    if args.onnx:  # fail before the (slow) export when a package is missing
        for module in ("onnx", "onnxscript", "onnxruntime"):
            _need(module)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.checkpoint)
    k, s = len(loaded.classes), loaded.image_size
    status = 0
    if args.onnx:
        try:
            path = export_onnx(loaded, args.onnx, opset=args.opset)
        except ExportError as exc:
            print(f"qcs export: error: {exc}" + ("" if args.torch_export else
                  "; --torch-export OUT.pt2 may still work"), file=sys.stderr)
            return 1
        report = verify_onnx(loaded, path, tolerance=args.tolerance)
        verdict = "OK" if report.ok else f"ABOVE the tolerance {args.tolerance:g}"
        verdict += f"; largest |logit| {report.max_abs_logit:.3g}"
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB): input images "
              f"[batch, {loaded.channels}, {s}, {s}] float32, output logits [batch, {k}] "
              f"for classes "
              f"{', '.join(loaded.classes)}")
        print(f"onnxruntime vs PyTorch, batches {list(report.batch_sizes)}: largest logit "
              f"difference {report.max_abs_diff:.3g} ({verdict})")
        status = 0 if report.ok else 1
    if args.torch_export:
        path = export_program(loaded, args.torch_export)
        print(f"wrote {path} (torch.export program; torch.export.load(path).module())")
    if status:
        print(f"qcs export: error: the ONNX model differs from PyTorch by more than "
              f"--tolerance {args.tolerance:g}", file=sys.stderr)
    return status
