"""asam_compile.measure: the timer and the run header that the command line and the benchmarks share."""

from __future__ import annotations

import pytest
import torch

from asam_compile import __version__, measure


def test_time_ms_is_the_median_of_the_timed_calls_after_the_warm_up(monkeypatch):
    calls = []
    # perf_counter is read before and after each timed call: durations 3, 1, 2 ms -> median 2 ms
    clock = iter([0.0, 0.003, 1.0, 1.001, 2.0, 2.002])
    monkeypatch.setattr(measure.time, "perf_counter", lambda: next(clock))
    assert measure.time_ms(lambda: calls.append(1), "cpu", iters=3, warmup=2) == pytest.approx(2.0)
    assert len(calls) == 5


def test_time_ms_measures_real_calls_on_cpu():
    x = torch.randn(64, 64)
    assert measure.time_ms(lambda: x @ x, "cpu", iters=3, warmup=1) > 0


def test_time_ms_refuses_zero_iterations():
    with pytest.raises(ValueError, match="iters"):
        measure.time_ms(lambda: None, "cpu", iters=0)


def test_run_header_records_versions_date_command_then_the_workload():
    header = measure.run_header("cpu", command="python bench.py --seq 8", workload="attention alone", heads=16)
    assert list(header)[:len(measure.HEADER_KEYS)] == list(measure.HEADER_KEYS)
    assert header["torch"] == torch.__version__ and header["asam_compile"] == __version__
    assert header["device_name"].startswith("cpu (") and header["command"] == "python bench.py --seq 8"
    assert list(header)[len(measure.HEADER_KEYS):] == ["workload", "heads"]


def test_run_header_refuses_a_workload_field_named_like_its_own():
    with pytest.raises(ValueError, match="torch"):
        measure.run_header("cpu", torch="2.0")


def test_header_line_is_one_line_with_the_workload_and_the_command():
    header = measure.run_header("cpu", command="asam-compile bench --seq 8", workload="Llama 8L", pad=None, heads=16)
    line = measure.header_line(header)
    assert "\n" not in line
    assert line.startswith("device: cpu (") and f"torch {torch.__version__}" in line
    assert f"asam_compile {__version__}" in line and header["date"] in line
    assert line.endswith("| Llama 8L | heads 16 | $ asam-compile bench --seq 8")
    assert "pad" not in line  # a workload field that is None is left out


def test_command_line_is_this_process_as_it_could_be_typed_again(monkeypatch):
    monkeypatch.setattr(measure.sys, "argv", ["benchmarks/exact/bench_swa.py", "--seqs", "512", "--json", "a b.json"])
    monkeypatch.setitem(measure.sys.modules, "__main__", object())  # a script, not `python -m`
    assert measure.command_line() == "python benchmarks/exact/bench_swa.py --seqs 512 --json 'a b.json'"


def test_is_oom_sees_through_wrapped_exceptions():
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("compile failed") from inner
    except RuntimeError as outer:
        assert measure.is_oom(outer)
    assert not measure.is_oom(ValueError("bad value")) and not measure.is_oom(None)
    assert measure.describe_error(ValueError("first line\nsecond")) == "ValueError: first line"
