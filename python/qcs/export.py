"""``qcs export``: the inference network of a checkpoint as ONNX (and optionally as a
``torch.export`` program).

Only the base network is exported (backbone, level embeddings, ViT_base): the cross branch
and its CSA op are training-time only, so the exported graph holds standard ONNX ops and
runs anywhere onnxruntime does. Input ``images``: float32 ``[batch, C, S, S]`` normalised
with the ImageNet mean / std (``C = 3``; a PCD network on landmark heat maps takes them as
extra channels; ``S`` = the checkpoint's ``data.image_size``); output ``logits``:
``[batch, K]``. The batch axis is dynamic. The file's metadata (``qcs.classes``,
``qcs.image_size``, ``qcs.channels``, ``qcs.mean``, ``qcs.std``, ...) holds what is needed
to use it without the checkpoint: ``qcs predict --checkpoint model.onnx`` does
(:mod:`qcs.onnx_model`).

After writing, the file is checked with ``onnx.checker`` and run with onnxruntime on seeded
inputs at two batch sizes; the largest absolute logit difference against PyTorch is
reported and must be at most ``tolerance * max(1, largest |logit|)`` (absolute for the
usual logits of a few units, relative for networks with large logits).
Needs onnx, onnxscript and onnxruntime (the ``export`` extra: ``pip install -e '.[export]'``
in a clone).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .errors import ExportError, MissingDependency
from .inference import LoadedModel

__all__ = [
    "ExportError",
    "ExportReport",
    "export_onnx",
    "export_program",
    "need",
    "onnx_metadata",
    "verify_onnx",
]


@dataclass
class ExportReport:
    """The check of an exported ONNX file against PyTorch (see :func:`verify_onnx`)."""

    path: Path
    batch_sizes: tuple[int, ...]
    max_abs_diff: float
    tolerance: float
    max_abs_logit: float = 0.0

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance * max(1.0, self.max_abs_logit)


def need(module: str):
    """Import ``module`` (an optional dependency of export) or raise
    :class:`MissingDependency` naming the extra that provides it."""
    try:
        return __import__(module)
    except ImportError:
        raise MissingDependency(f"ONNX export needs {module}: pip install onnx onnxscript "
                                "onnxruntime (the 'export' extra: pip install -e '.[export]' "
                                "in a qcs-ext clone)") from None


def export_onnx(loaded: LoadedModel, out: str | Path, opset: int = 18) -> Path:
    """Write the base network of ``loaded`` to ``out`` (one self-contained ``.onnx`` file)
    with a dynamic batch axis, via the ``torch.export``-based exporter."""
    need("onnxscript")
    onnx = need("onnx")
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
    proto = onnx.load(str(out))
    onnx.helper.set_model_props(proto, onnx_metadata(loaded))
    proto.doc_string = (
        f"qcs-ext {__version__}: facial expression logits of {type(model).__name__} "
        f"(see the qcs.* metadata for the classes and the input normalisation)"
    )
    onnx.save(proto, str(out))
    onnx.checker.check_model(str(out), full_check=True)
    return out


def onnx_metadata(loaded: LoadedModel) -> dict[str, str]:
    """What a user of the ``.onnx`` file needs besides the graph, as ONNX metadata
    (strings; lists as JSON): the class names in logit order, the input size and channels,
    the test resize before the centre crop (0: none), the data layout (its face-alignment
    template) and the normalisation ``(x / 255 - mean) / std`` applied to RGB inputs."""
    return {
        "qcs.classes": json.dumps(list(loaded.classes)),
        "qcs.image_size": str(loaded.image_size),
        "qcs.channels": str(loaded.channels),
        "qcs.mean": json.dumps(list(loaded.mean)),
        "qcs.std": json.dumps(list(loaded.std)),
        "qcs.resize": str(loaded.resize),
        "qcs.data_format": loaded.data_format,
        "qcs.input": "images: float32 [batch, channels, image_size, image_size], RGB, normalised",
        "qcs.output": "logits: float32 [batch, classes]",
        "qcs.network": f"{loaded.family.name}/{loaded.family.run_name(loaded.config.net)}",
        "qcs.epoch": str(loaded.meta.get("epoch", "")),
        "qcs.version": __version__,
    }


@torch.no_grad()
def verify_onnx(
    loaded: LoadedModel,
    path: str | Path,
    batch_sizes: tuple[int, ...] = (1, 5),
    tolerance: float = 1e-4,
    seed: int = 0,
) -> ExportReport:
    """Run ``path`` with onnxruntime (CPU) and the PyTorch model on the same seeded
    inputs ``[b, 3, S, S]`` for each ``b`` in ``batch_sizes``; report the largest absolute
    logit difference."""
    ort = need("onnxruntime")
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
            raise RuntimeError(
                f"{path}: onnxruntime returned logits of shape {got.shape} for "
                f"batch {b}, PyTorch {tuple(ref.shape)}"
            )
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
    program = torch.export.export(
        loaded.model.eval().cpu(),
        (torch.zeros(2, loaded.channels, s, s),),
        dynamic_shapes=({0: batch},),
    )
    torch.export.save(program, str(out))
    return out
