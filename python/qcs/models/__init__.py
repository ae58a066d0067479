"""Networks: the IR50 backbone, the QCS / DCS / baseline model, DAN and PCD."""

from .ir50 import IR50, LoadReport, load_backbone_weights
from .losses import qcs_loss
from .network import BRANCHES, QCSNet, count_parameters
from .factory import build_model  # by model.family: QCSNet, DAN or PCD

__all__ = ["IR50", "LoadReport", "load_backbone_weights", "qcs_loss", "BRANCHES", "QCSNet",
           "build_model", "count_parameters"]
