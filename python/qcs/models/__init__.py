"""Networks: the IR50 backbone and the QCS / DCS / baseline model."""

from .ir50 import IR50, LoadReport, load_backbone_weights
from .losses import qcs_loss
from .network import BRANCHES, QCSNet, build_model, count_parameters

__all__ = ["IR50", "LoadReport", "load_backbone_weights", "qcs_loss", "BRANCHES", "QCSNet",
           "build_model", "count_parameters"]
