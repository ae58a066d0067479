"""The Python entry points re-exported by :mod:`qcs`: load a config, train, load a model,
predict, export. (``predict_images`` and ``export_onnx`` are named apart from the modules
:mod:`qcs.predict` and :mod:`qcs.export`, which they use.) ``docs/python-api.md`` shows
each in use; its examples run as a test.

Each function is a thin layer over the module that does the work (:mod:`qcs.config`,
:mod:`qcs.training`, :mod:`qcs.inference`, :mod:`qcs.predict`, :mod:`qcs.export`); they
raise :class:`qcs.errors.QCSError` subclasses with messages naming the bad argument.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

__all__ = ["load_config", "load_model", "predict_images", "export_onnx"]


def load_config(source: str | Path = "tiny", overrides: Sequence[str] = ()):
    """A :class:`qcs.config.Config` from a preset name (``tiny``, ``paper-qcs``, ...) or a
    TOML file, with ``overrides`` such as ``["train.epochs=3", "model.dropout=0.1"]``
    applied (the same syntax as ``qcs train --set``); validated."""
    from .config import apply_overrides
    from .config import load_config as load
    cfg = load(str(source))
    return apply_overrides(cfg, list(overrides)).validate() if overrides else cfg.validate()


def load_model(checkpoint: str | Path, *, device: str = "cpu"):
    """The network of a checkpoint (a run directory means its best one) in eval mode, as a
    :class:`qcs.inference.LoadedModel` (``.model``, ``.classes``, ``.config``,
    ``.transform()``); a path ending in ``.onnx`` gives a
    :class:`qcs.onnx_model.OnnxModel` run by onnxruntime instead."""
    if str(checkpoint).endswith(".onnx"):
        from .onnx_model import load_onnx
        return load_onnx(checkpoint, device=device)
    from .inference import load_model as load
    return load(checkpoint, device=device)


def predict_images(model, inputs: str | Path | Iterable[str | Path], *, detect: bool = True,
                   device: str = "cpu", **options: Any) -> Iterator[dict[str, Any]]:
    """Classify the faces in ``inputs`` (image files, directories, glob patterns) with
    ``model`` (a checkpoint path, a ``.onnx`` file, or what :func:`load_model` returned).

    Yields one record per face as ``qcs predict`` writes them (``file``, ``status``,
    ``box``, ``label``, ``confidence``, ``probabilities``, ...), in input order, as the
    images are processed; inputs that name nothing yield an ``error`` record.
    ``detect=False`` takes each image as one face crop. Other ``options`` go to
    :class:`qcs.predict.Predictor` (``margin``, ``batch_size``, ``align``, ...)."""
    from .predict import Predictor, collect_inputs
    loaded = load_model(model, device=device) if isinstance(model, (str, Path)) else model
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    paths, problems = collect_inputs([str(i) for i in items])
    for arg, why in problems:
        yield {"file": arg, "status": "error", "face": None, "box": None, "label": None,
               "confidence": None, "probabilities": None, "notes": [], "message": why}
    yield from Predictor(loaded, detect=detect, device=device, **options).run(paths)


def export_onnx(model, onnx_path: str | Path, *, tolerance: float = 1e-4):
    """Write the inference network of ``model`` (a checkpoint path or a
    :class:`qcs.inference.LoadedModel`) to ``onnx_path`` with its metadata, run it with
    onnxruntime against PyTorch and return the :class:`qcs.export.ExportReport`
    (``.ok``, ``.max_abs_diff``). Needs the ``export`` extra."""
    from .export import export_onnx as write_onnx
    from .export import verify_onnx
    loaded = load_model(model) if isinstance(model, (str, Path)) else model
    path = write_onnx(loaded, onnx_path)
    return verify_onnx(loaded, path, tolerance=tolerance)
