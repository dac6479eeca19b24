"""The README's expected demo output holds: the full default demo lands inside the stated band.

Slow (about 12 minutes on 2 cores):
``python -m pytest -m slow tests/integration/test_demo_band.py``.
``bench/demo_spread.py`` runs the same check over repeated runs and thread counts.
"""

import json

import pytest

from siamese_detr.cli.main import main
from siamese_detr.demo.demo import EXPECTED_AP, within_band


@pytest.mark.slow
def test_default_demo_lands_in_the_readme_band(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["scratch"]["runs"]) == len(results["siamese"]["runs"]) == 3
    assert within_band(results) == [], f"band {EXPECTED_AP}"
