"""The golden figures: short seeded runs of the shipped teachers (pixel and text) through
consistency, guidance and progressive distillation give the losses and samples recorded in
``tests/golden.json`` before the one-family-path refactor (every model through its adapter). The
tolerance covers the last bits in which CPUs' float kernels differ (AVX2, AVX-512, AMX), not a
change in what is computed: a wrong null class, guidance scale or label grid moves these figures
by orders of magnitude more. Re-record (``python tests/golden.py > tests/golden.json``) only for a
change meant to alter the numbers, and say why in the commit."""

import json

import pytest
from golden import CASES, GOLDEN_FILE, figures

GOLDEN = json.loads(GOLDEN_FILE.read_text())


@pytest.mark.parametrize("case", sorted(CASES))
def test_figures_match_the_recorded_run(case, tmp_path):
    got, want = figures(case, tmp_path), GOLDEN[case]
    assert len(got["losses"]) == len(want["losses"])
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-3, abs=1e-6)
    assert got["images"] == pytest.approx(want["images"], abs=1e-3)


def test_a_changed_computation_is_caught(tmp_path, monkeypatch):
    """The tolerance is tight enough: guidance 1.4 instead of 1.5 fails the comparison."""
    teacher, stage = CASES["pixel_consistency"]
    monkeypatch.setitem(CASES, "pixel_consistency", (teacher, stage.replace("1.5", "1.4")))
    got, want = figures("pixel_consistency", tmp_path), GOLDEN["pixel_consistency"]
    assert got["images"] != pytest.approx(want["images"], abs=1e-3)
