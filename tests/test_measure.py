"""The measurement rules every speed figure uses (pipeline/measure.py), on plain numbers."""

from pipeline.measure import fmt, median_range, warmup_count


def test_warmup_is_ten_steps_or_a_fifth_of_a_short_segment():
    assert [warmup_count(n) for n in (0, 4, 5, 24, 50, 51, 10_000)] == [0, 0, 1, 4, 10, 10, 10]


def test_repeats_are_median_min_max_and_met_against_a_target():
    r = median_range([1.2, 0.9, 1.05], target=1.0)
    assert (r["value"], r["min"], r["max"], r["repeats"], r["met"]) == (1.05, 0.9, 1.2, 3, True)
    assert median_range([0.8, 0.95], target=1.0)["met"] is False
    assert "target" not in median_range([1.0])
    assert fmt(r, "x", digits=2) == "1.05x [0.90-1.20]"
