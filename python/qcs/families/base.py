"""The family interface: what the trainer and the tools may ask of a model family.

``B`` batch, ``R`` items per sampled tuple (branches), ``K`` classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import CheckpointError, UsageError

if TYPE_CHECKING:  # annotations only: importing a family's config is torch-free
    import torch
    from torch import nn

    from ..models.outputs import BranchOutput
    from ..models.weights import LoadReport

__all__ = ["DataNeeds", "Family", "Losses"]


@dataclass
class Losses:
    """A training loss and its parts: ``total`` (the tensor to differentiate) and ``parts``
    (Python floats for the logs; ``"base"`` always, ``"cross"`` for two-branch families)."""

    total: torch.Tensor
    parts: dict[str, float]


@dataclass(frozen=True)
class DataNeeds:
    """What a family needs from the data: ``branches`` images per sampled tuple (the anchor
    first), ``min_per_class`` images of every class (2 when a positive of the anchor's class
    is drawn), ``heatmap_channels`` landmark heat-map channels stored beside the images
    (``0``: RGB only)."""

    branches: int = 1
    min_per_class: int = 1
    heatmap_channels: int = 0

    @property
    def channels(self) -> int:
        """Input channels of the network: RGB plus the heat maps."""
        return 3 + self.heatmap_channels


class Family:
    """One model family. Subclasses set ``name`` and ``section`` (the dataclass of the
    family's config section ``[name]``) and implement :meth:`build` and :meth:`loss`; the
    other methods have defaults that fit a single-branch RGB classifier."""

    name: ClassVar[str] = ""
    section: ClassVar[type] = object

    # ------------------------------------------------------------------ config
    def checks(self, sec: Any) -> list[tuple[str, bool, str]]:
        """``(key, ok, expected)`` checks of the section (see :func:`qcs.config.check_fields`)."""
        return []

    def upgrade_legacy(self, flat: dict[str, Any]) -> dict[str, Any]:
        """This family's section from the flat ``[model]`` + ``[loss]`` keys of an older
        checkpoint (default: the keys the section has, by name)."""
        names = {f for f in self.section.__dataclass_fields__}
        return {k: v for k, v in flat.items() if k in names}

    def resolve(self, sec: Any, classes: tuple[str, ...]) -> None:
        """Fill settings that depend on the dataset's class names (default: none)."""

    def run_name(self, sec: Any) -> str:
        """A short name for run directories (``runs/<time>-<name>``)."""
        return self.name

    # ------------------------------------------------------------------ data
    def data_needs(self, sec: Any) -> DataNeeds:
        """What the data must provide (see :class:`DataNeeds`)."""
        return DataNeeds()

    # ------------------------------------------------------------------ network and loss
    def build(self, sec: Any, num_classes: int) -> nn.Module:
        """A fresh network (``model(x [B, C, H, W]) -> [B, K]`` and
        ``model.forward_branches(xs [R, B, C, H, W]) -> BranchOutput``)."""
        raise NotImplementedError

    def loss(self, out: BranchOutput, labels: torch.Tensor, sec: Any) -> Losses:
        """The training loss of one step; ``labels [R, B]``."""
        raise NotImplementedError

    def describe(self, model: nn.Module, sec: Any, device: torch.device) -> str:
        """One line for the log: the network and how it runs."""
        n = sum(p.numel() for p in model.parameters())
        return f"model {self.run_name(sec)}: {n / 1e6:.2f}M parameters"

    # ------------------------------------------------------------------ weights
    def load_pretrained(self, model: nn.Module, path: str | Path) -> LoadReport:
        """Load pretrained backbone weights from ``path`` (``train.pretrained``)."""
        raise CheckpointError(f"the {self.name} family takes no pretrained weights "
                              f"(train.pretrained = {str(path)!r})")

    def load_extra_weights(self, model: nn.Module, sec: Any) -> list[LoadReport]:
        """Other weights the section names (e.g. a frozen landmark network); default none."""
        return []

    # ------------------------------------------------------------------ inference
    def inference_section(self, sec: Any) -> Any:
        """The section of the network inference builds (default: the trained one)."""
        return sec

    def inference_weights(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The checkpoint tensors that network takes (default: all)."""
        return state

    def has_cross_maps(self, sec: Any) -> bool:
        """Whether the network has cross-similarity maps to draw (``qcs visualize``)."""
        return False

    def require_cross_maps(self, sec: Any, where: str) -> None:
        """Raise :class:`CheckpointError` unless :meth:`has_cross_maps`."""
        if not self.has_cross_maps(sec):
            raise CheckpointError(f"{where}: a {self.run_name(sec)} network has no cross "
                                  "branch (no CSA maps)")

    def input_error(self, channels: int, base: Any) -> UsageError | None:
        """Why photos (RGB) cannot be fed to this network, or None (``qcs predict``)."""
        if channels == 3:
            return None
        return UsageError(f"{base}: this network reads {channels} input channels (RGB + "
                          "landmark heat maps stored beside the training images), which qcs "
                          "predict cannot make for new photos")
