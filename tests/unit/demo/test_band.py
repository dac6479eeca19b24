"""The band check of the demo's results (README expected output, bench/demo_spread.py)."""

from siamese_detr.demo.demo import EXPECTED_AP, within_band


def _results(scratch: float, siamese: float) -> dict:
    return {"scratch": {"mean": {"coco/AP": scratch}}, "siamese": {"mean": {"coco/AP": siamese}},
            "gain": {"coco/AP": {"mean": siamese - scratch}}}


BAND = {"scratch": (20.0, 30.0), "siamese": (30.0, 40.0), "gain": (5.0, 20.0)}


def test_inside_the_band_nothing_is_reported():
    assert within_band(_results(0.25, 0.35), BAND) == []
    assert within_band(_results(0.20, 0.30), BAND) == []  # edges are inside (gain 10)


def test_each_miss_is_named_with_its_value_and_band():
    # the README's original failure: scratch at 12.9 AP, Siamese 34.6
    assert within_band(_results(0.129, 0.346), BAND) == [
        "scratch AP 12.9 outside [20, 30]", "gain AP 21.7 outside [5, 20]"]
    assert within_band(_results(0.29, 0.31), BAND) == ["gain AP 2.0 outside [5, 20]"]


def test_default_band_is_ordered_and_demands_a_gain():
    for lo, hi in EXPECTED_AP.values():
        assert lo < hi
    assert EXPECTED_AP["gain"][0] > 0
    assert EXPECTED_AP["scratch"][1] < EXPECTED_AP["siamese"][1]
