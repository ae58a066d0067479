"""The QCS-family variants and their number of branches (images per sampled tuple)."""

__all__ = ["BRANCHES"]

BRANCHES = {"qcs": 4, "dcs": 2, "baseline": 1}
