"""Unit tests of the download planner (which ranges to request): no sockets."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from p2pdist.download import plan_spans


def test_spans_are_consecutive_runs() -> None:
    assert plan_spans([0, 1, 2, 5, 6, 9], workers=1, max_span=8) == [[0, 1, 2], [5, 6], [9]]


def test_spans_are_short_enough_to_keep_every_worker_busy() -> None:
    spans = plan_spans(list(range(64)), workers=8, max_span=8)
    assert len(spans) >= 16
    assert all(len(s) <= 4 for s in spans)


def test_spans_capped_by_max_span() -> None:
    spans = plan_spans(list(range(1000)), workers=2, max_span=8)
    assert max(len(s) for s in spans) == 8


def test_no_spans_for_nothing_missing() -> None:
    assert plan_spans([], workers=4) == []


@given(
    st.sets(st.integers(min_value=0, max_value=500)),
    st.integers(min_value=1, max_value=32),
    st.integers(min_value=1, max_value=16),
)
def test_spans_cover_each_missing_piece_once_in_order(
    missing: set[int], workers: int, max_span: int
) -> None:
    ordered = sorted(missing)
    spans = plan_spans(ordered, workers=workers, max_span=max_span)
    assert [i for span in spans for i in span] == ordered
    for span in spans:
        assert 1 <= len(span) <= max_span
        assert span == list(range(span[0], span[0] + len(span)))
