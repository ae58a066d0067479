"""Networks: the IR50 backbone, the QCS / DCS / baseline model, DAN and PCD, their losses
and the one weight loader. Families (:mod:`qcs.families`) build them from a config."""

from .ir50 import IR50, load_backbone_weights
from .losses import qcs_loss
from .network import BRANCHES, QCSNet, count_parameters
from .outputs import BranchOutput
from .weights import LoadReport, load_matching, read_state

__all__ = ["IR50", "LoadReport", "load_backbone_weights", "load_matching", "read_state",
           "qcs_loss", "BRANCHES", "QCSNet", "BranchOutput", "count_parameters"]
