"""qcs_tools/compare.py: the rounds really interleave, and the table's ratios are the
medians of per-round ratios."""

from __future__ import annotations

import statistics

import pytest

from qcs_tools import compare as compare_module


@pytest.fixture(scope="module")
def compare():
    return compare_module


def test_rounds_interleave_the_implementations(compare, monkeypatch):
    calls = []
    monkeypatch.setattr(compare, "measure", lambda fn, _seconds: fn() or len(calls))
    fns = {name: (lambda name=name: calls.append(name)) for name in ("fused", "eager", "gemms")}
    per_round = compare.measure_interleaved(fns, min_run_time=0.3, rounds=3)
    warmup, timed = calls[:3], calls[3:]
    assert warmup == ["fused", "eager", "gemms"]
    assert timed == ["fused", "eager", "gemms"] * 3  # round by round, not impl by impl
    assert {name: len(v) for name, v in per_round.items()} == {"fused": 3, "eager": 3, "gemms": 3}


def test_table_reports_median_of_per_round_ratios(compare, monkeypatch, capsys):
    # Round times chosen so the median of ratios (2.0) differs from the ratio of medians.
    fake = {"fused": [1.0, 1.0, 4.0], "eager": [2.0, 3.0, 8.0], "gemms": [1.0, 1.0, 1.0]}
    monkeypatch.setattr(compare, "case", lambda impl, shape, backward: impl)
    monkeypatch.setattr(compare, "measure_interleaved",
                        lambda fns, seconds, rounds: {k: fake[k] for k in fns})
    monkeypatch.setattr(compare, "saved_bytes_ratio", lambda impl, shape: 0.5)
    assert compare.main(["--shapes", "2x3x4", "--impls", "fused", "eager", "gemms",
                         "--rounds", "3"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 2x3x4 | fwd")]
    assert len(rows) == 2
    cells = [c.strip() for c in rows[1].split("|")[1:-1]]
    assert cells[2] == f"{statistics.median(fake['fused']) * 1e3:.2f} ms"
    assert cells[5] == "2.00x"  # eager / fused per round: 2, 3, 2 -> median 2
    assert cells[6] == "-" and cells[7] == "-"  # no compiled or sdpa column measured
    assert cells[8] == "1.00"  # fused / gemms per round: 1, 1, 4 -> median 1


def test_bad_arguments_are_refused(compare):
    with pytest.raises(SystemExit):
        compare.main(["--rounds", "0"])
    with pytest.raises(SystemExit):
        compare.main(["--shapes", "24x49"])
