"""RollingWindow: calls and failures over the last `seconds`, at bucket resolution."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway_breaker.window import BUCKETS, RollingWindow

T0 = 1_000.0  # whole seconds, so 1 s buckets of a 10 s window start on exact boundaries


def test_empty_window_counts_nothing() -> None:
    window = RollingWindow(10)
    assert window.counts(T0) == (0, 0)


def test_counts_calls_and_failures_inside_the_window() -> None:
    window = RollingWindow(10)
    window.record(T0, failed=True)
    window.record(T0 + 1, failed=False)
    window.record(T0 + 2.5, failed=True)
    window.record(T0 + 2.5, failed=False)
    assert window.counts(T0 + 3) == (4, 2)
    assert window.counts(T0 + 8.9) == (4, 2)


def test_buckets_slide_out_one_by_one() -> None:
    window = RollingWindow(10)
    window.record(T0, failed=True)
    window.record(T0 + 3, failed=False)
    window.record(T0 + 6, failed=True)
    assert window.counts(T0 + 9.5) == (3, 2)
    assert window.counts(T0 + 10.5) == (2, 1)  # the call at T0 is older than the window
    assert window.counts(T0 + 13.5) == (1, 1)
    assert window.counts(T0 + 16.5) == (0, 0)


def test_a_call_counts_for_between_one_bucket_short_of_the_window_and_the_window() -> None:
    seconds = 10.0
    width = seconds / BUCKETS
    for offset in (0.0, 0.3, 0.5, 0.99):
        window = RollingWindow(seconds)
        start = T0 + offset
        window.record(start, failed=False)
        assert window.counts(start + seconds - width - 0.01) == (1, 0)
        assert window.counts(start + seconds) == (0, 0)


def test_recording_keeps_counting_as_time_moves_on() -> None:
    window = RollingWindow(10)
    for i in range(100):  # one call per 0.5 s: the window holds the last ~20
        window.record(T0 + i * 0.5, failed=i % 2 == 0)
        calls, failures = window.counts(T0 + i * 0.5)
        assert calls <= i + 1
        assert 0 <= failures <= calls <= 20
    calls, failures = window.counts(T0 + 99 * 0.5)
    assert 18 <= calls <= 20
    assert abs(2 * failures - calls) <= 1


def test_a_long_gap_empties_the_window() -> None:
    window = RollingWindow(10)
    for i in range(10):
        window.record(T0 + i, failed=True)
    assert window.counts(T0 + 9) == (10, 10)
    assert window.counts(T0 + 10_000) == (0, 0)
    window.record(T0 + 10_000, failed=False)
    assert window.counts(T0 + 10_000) == (1, 0)


def test_a_gap_of_whole_windows_does_not_resurrect_old_buckets() -> None:
    # After exactly 2 or 3 windows every bucket index lands where an old one was.
    for gap in (20.0, 30.0, 10.0):
        window = RollingWindow(10)
        for i in range(10):
            window.record(T0 + i, failed=True)
        window.record(T0 + 9 + gap, failed=False)
        assert window.counts(T0 + 9 + gap) == (1, 0), gap


def test_small_step_back_keeps_counts_and_counts_the_new_call() -> None:
    window = RollingWindow(10)
    window.record(T0 + 5, failed=True)
    window.record(T0 + 3, failed=False)  # the clock was adjusted back 2 s
    assert window.counts(T0 + 3) == (2, 1)
    assert window.counts(T0 + 5) == (2, 1)
    # Nothing leaks: everything slides out once the window has passed.
    assert window.counts(T0 + 30) == (0, 0)


def test_large_step_back_starts_over_and_never_goes_negative() -> None:
    window = RollingWindow(10)
    for i in range(5):
        window.record(T0 + 100 + i, failed=True)
    assert window.counts(T0) == (0, 0)  # those calls lie in this clock's future
    window.record(T0, failed=False)
    assert window.counts(T0) == (1, 0)
    # Moving forward again, old and new calls slide out without going negative.
    for t in (T0 + 5, T0 + 50, T0 + 104, T0 + 200):
        calls, failures = window.counts(t)
        assert 0 <= failures <= calls
    assert window.counts(T0 + 200) == (0, 0)


def test_reset_clears_everything() -> None:
    window = RollingWindow(10)
    for i in range(7):
        window.record(T0 + i, failed=True)
    window.reset()
    assert window.counts(T0 + 7) == (0, 0)
    window.record(T0 + 7, failed=True)
    assert window.counts(T0 + 7) == (1, 1)


def test_fractional_window_lengths() -> None:
    window = RollingWindow(1.25)  # 0.125 s buckets, exact in binary
    window.record(T0, failed=True)
    assert window.counts(T0 + 1.0) == (1, 1)
    assert window.counts(T0 + 1.25) == (0, 0)


@settings(max_examples=150, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.integers(min_value=-30, max_value=150),  # tenths of a second, sometimes back
            st.booleans(),
        ),
        max_size=80,
    )
)
def test_counts_match_a_reference_within_bucket_resolution(steps: list[tuple[int, bool]]) -> None:
    """With a clock that only moves forward, every call younger than `seconds - width` counts
    and no call at least `seconds` old does; with steps back counts never go negative."""
    seconds, width = 10.0, 1.0
    window = RollingWindow(seconds)
    now = T0
    monotonic = True
    calls: list[tuple[float, bool]] = []
    for tenths, failed in steps:
        if tenths < 0:
            monotonic = False
        now += tenths / 10
        window.record(now, failed)
        calls.append((now, failed))
        got_calls, got_failures = window.counts(now)
        assert 0 <= got_failures <= got_calls
        if monotonic:
            sure = [f for t, f in calls if now - t < seconds - width - 1e-6]
            maybe = [f for t, f in calls if now - t < seconds + 1e-6]
            assert len(sure) <= got_calls <= len(maybe)
            assert sum(sure) <= got_failures <= sum(maybe)
