"""pytest-benchmark suite of the CSA ops (not collected by the test run: testpaths=tests).

    .venv/bin/python -m pytest benchmarks/test_bench_ops.py \
        --benchmark-group-by=param:shape,param:backward

Each group holds the fused op and its baselines at one shape, measured in the same run;
compare within a group, not across machines. python -m qcs_tools.compare prints the ratios.
"""

from __future__ import annotations

import pytest

from qcs_tools.ops_cases import IMPLEMENTATIONS, SHAPES, case


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_csa(benchmark, impl, backward, shape):
    fn = case(impl, shape, backward)
    fn()  # warm-up outside the timing (compiles torch.compile's graph)
    benchmark(fn)
