"""dlrun.deploy.profile's arithmetic on Inspector events: per-operator sums per run, overheads, shares, and the
delegate time unit check (issue 13)."""

from __future__ import annotations

import pytest

from dlrun.deploy import profile


def event(name, times, *, delegated=False, backend=None, op_types=()):
    return {"name": name, "delegated": delegated, "backend": backend, "op_types": list(op_types), "times_us": times}


def program_events(conv_scale: float = 1.0) -> list[dict]:
    """Two runs of: a portable op, one XNNPACK delegate holding two convolutions and a pooling, the whole run."""
    return [
        event("OPERATOR_CALL", [1.0, 1.0], op_types=["sym_size.int"]),
        event(
            "Convolution (NHWC, F32) IGEMM #1", [10 * conv_scale, 12 * conv_scale], delegated=True, backend="XNNPACK"
        ),
        event("Max Pooling (NHWC, F32) #1", [2 * conv_scale, 2 * conv_scale], delegated=True, backend="XNNPACK"),
        event(
            "Convolution (NHWC, F32) IGEMM #2", [20 * conv_scale, 20 * conv_scale], delegated=True, backend="XNNPACK"
        ),
        event("DELEGATE_CALL", [40.0, 40.0], backend="XNNPACK"),
        event("Method::execute", [50.0, 50.0]),
    ]


def by_name(rows):
    return {row.operator: row for row in rows}


def test_operators_sum_calls_per_run_and_split_the_whole_run():
    rows = by_name(profile.operators(program_events()))
    conv = rows["Convolution (NHWC, F32) IGEMM"]
    assert conv.calls == 2 and conv.delegate == "XNNPACK"
    assert conv.p50_us == pytest.approx(31.0)  # runs: 30, 32
    assert rows["Max Pooling (NHWC, F32)"].p50_us == pytest.approx(2.0)
    assert rows["(XNNPACK overhead)"].p50_us == pytest.approx(40 - 33)  # median of 8 and 6
    assert rows["sym_size.int"].delegate == "portable"
    assert rows["(runtime overhead)"].p50_us == pytest.approx(50 - 40 - 1)
    assert sum(row.share for row in rows.values()) == pytest.approx(1.0, abs=0.01)
    assert list(rows)[0] == "Convolution (NHWC, F32) IGEMM"  # slowest first


@pytest.mark.parametrize("scale", [1e3, 1e6])
def test_delegate_events_in_another_unit_are_normalised(scale):
    events = profile.normalise_delegate_units(program_events(conv_scale=scale))
    rows = by_name(profile.operators(events))
    assert rows["Convolution (NHWC, F32) IGEMM"].p50_us == pytest.approx(31.0)


def test_events_in_the_same_unit_are_left_alone():
    events = profile.normalise_delegate_units(program_events())
    assert events[1]["times_us"] == [10.0, 12.0]


def test_percentile_interpolates():
    assert profile._percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert profile._percentile([5.0], 90) == 5.0
    assert profile._percentile([], 50) == 0.0


def test_event_rows_hold_every_run():
    rows = profile.event_rows(program_events())
    assert rows[1]["event"] == "Convolution (NHWC, F32) IGEMM #1" and rows[1]["runs"] == 2
    assert rows[1]["times_us"] == "10.000 12.000"
