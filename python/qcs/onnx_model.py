"""Running an exported ``.onnx`` file on its own, through onnxruntime.

``qcs export`` writes the class names, input size, channel count and normalisation into the
file's metadata (:func:`qcs.export.onnx_metadata`); :func:`load_onnx` reads them back, so
``qcs predict --checkpoint model.onnx`` needs neither the checkpoint nor torch's network
code. :class:`OnnxModel` offers the part of :class:`qcs.inference.LoadedModel` that
prediction uses (``model``, ``classes``, ``image_size``, ``channels``, ``transform()``).
Needs onnxruntime (``pip install -e '.[export]'``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2

from .errors import CheckpointError, MissingDependency
from .families import Family, get_family

__all__ = ["OnnxModel", "load_onnx", "read_onnx_metadata", "REQUIRED_KEYS"]

REQUIRED_KEYS = ("qcs.classes", "qcs.image_size", "qcs.channels", "qcs.mean", "qcs.std")


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependency("running an .onnx file needs onnxruntime: pip install "
                                "onnxruntime (or the 'export' extra)") from None
    return onnxruntime


def read_onnx_metadata(path: str | Path, props: dict[str, str]) -> dict[str, Any]:
    """Decode the ``qcs.*`` metadata ``props`` of ``path``: ``classes`` (list of str),
    ``image_size`` and ``channels`` (int), ``mean`` and ``std`` (tuples of float). Raises
    :class:`CheckpointError` naming the file and the missing or malformed key."""
    missing = [k for k in REQUIRED_KEYS if k not in props]
    if missing:
        raise CheckpointError(f"{path}: the ONNX metadata lacks {', '.join(missing)} (export it "
                              "again with this version's qcs export)")
    try:
        meta = {"classes": [str(c) for c in json.loads(props["qcs.classes"])],
                "image_size": int(props["qcs.image_size"]),
                "channels": int(props["qcs.channels"]),
                "mean": tuple(float(v) for v in json.loads(props["qcs.mean"])),
                "std": tuple(float(v) for v in json.loads(props["qcs.std"])),
                "network": props.get("qcs.network", "qcs"),
                "resize": int(props.get("qcs.resize", "0") or 0),
                "data_format": props.get("qcs.data_format", "raf-db")}
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: malformed qcs.* ONNX metadata: {exc}") from None
    if not meta["classes"] or len(meta["mean"]) != 3 or len(meta["std"]) != 3:
        raise CheckpointError(f"{path}: the ONNX metadata needs class names and 3 mean / std "
                              f"values, got {meta}")
    return meta


class _Session:
    """``torch [B, C, S, S] -> torch logits [B, K]`` through an onnxruntime session."""

    def __init__(self, session) -> None:
        self.session = session
        self.input = session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Run the graph on ``x`` (any device; computed where the session runs)."""
        data = np.ascontiguousarray(x.detach().float().cpu().numpy())
        (logits,) = self.session.run(None, {self.input: data})[:1]
        return torch.from_numpy(np.asarray(logits))


class OnnxModel:
    """An exported network with its metadata; ``model(x)`` maps normalised images
    ``[B, channels, S, S]`` to logits ``[B, K]``, ``classes`` are the ``K`` names."""

    def __init__(self, path: Path, session, meta: dict[str, Any]) -> None:
        self.base = path
        self.model = _Session(session)
        self.classes: list[str] = meta["classes"]
        self.image_size: int = meta["image_size"]
        self.channels: int = meta["channels"]
        self.mean: tuple[float, ...] = meta["mean"]
        self.std: tuple[float, ...] = meta["std"]
        self.resize: int = meta["resize"]
        self.data_format: str = meta["data_format"]
        self.meta = meta

    @property
    def family(self) -> Family:
        """The model family named in the metadata (``qcs.network = "family/name"``; files
        written before it was recorded count as ``qcs``): its rules decide what inputs
        prediction can make for this network."""
        return get_family(str(self.meta.get("network", "qcs")).split("/")[0])

    def transform(self) -> v2.Compose:
        """``uint8 [3, H, W] -> float32 [3, S, S]``: resize (then centre crop, where the
        recipe resizes larger), scale to [0, 1], normalise with the recorded mean / std."""
        steps: list = [v2.Resize((self.resize or self.image_size,) * 2, antialias=True)]
        if self.resize > self.image_size:
            steps.append(v2.CenterCrop((self.image_size, self.image_size)))
        return v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True),
                                   v2.Normalize(self.mean, self.std)])


def load_onnx(path: str | Path, device: str | torch.device = "cpu") -> OnnxModel:
    """Open ``path`` with onnxruntime (the CUDA provider for a CUDA ``device`` when the
    installed onnxruntime has it, else the CPU) and read its ``qcs.*`` metadata."""
    ort = _ort()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--checkpoint {path}: no such ONNX file")
    providers = ["CPUExecutionProvider"]
    cuda_ort = "CUDAExecutionProvider" in ort.get_available_providers()
    if torch.device(device).type == "cuda" and cuda_ort:
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = ort.InferenceSession(str(path), providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise CheckpointError(f"{path}: onnxruntime cannot load it: {exc}") from None
    meta = read_onnx_metadata(path, dict(session.get_modelmeta().custom_metadata_map))
    return OnnxModel(path, session, meta)
