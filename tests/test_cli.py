"""The command line: the demo runs end to end, prints its tables and writes its plots."""

from __future__ import annotations

import subprocess
import sys

import pytest

from paraseq.bench import format_table, time_call
from paraseq.cli import main


def test_demo_small(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rc = main(["demo", "--length", "300", "--gru-length", "120", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    for word in ("sequential", "parallel", "chunked", "auto", "newton", "quasi_newton",
                 "damped_newton", "picard", "jacobi", "speedup"):
        assert word in out
    for name in ("demo_linear_scan.png", "demo_solve_residuals.png"):
        png = tmp_path / name
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert str(png) in out


def test_demo_rejects_bad_length(capsys):
    assert main(["demo", "--length", "0", "--no-plot"]) == 2
    assert "--length must be >= 1" in capsys.readouterr().err


def test_module_entry_point():
    res = subprocess.run([sys.executable, "-m", "paraseq", "--version"], capture_output=True,
                         text=True, check=True)
    assert res.stdout.startswith("paraseq ")


def test_bench_helpers():
    calls = []
    t = time_call(lambda: calls.append(1), repeats=4, warmup=2)
    assert len(calls) == 6 and t.repeats == 4 and 0 <= t.best <= t.median
    table = format_table(["a", "bb"], [["x", 1], ["yyy", 22]])
    lines = table.splitlines()
    assert lines[0].split() == ["a", "bb"] and len({len(line) for line in lines}) == 1


def test_bench_small_grid_writes_table_csv_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rc = main(["bench", "--hidden", "1", "2", "--lengths", "80", "--batches", "2",
               "--repeats", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    for word in ("torch.nn.GRU ms", "auto path", "speedup", "fwd+bwd", "geometric-mean"):
        assert word in out
    lines = (tmp_path / "bench.csv").read_text().splitlines()
    assert len(lines) == 1 + 4  # header, 2 hidden x 2 passes
    assert "max_err" in lines[0]
    assert (tmp_path / "bench_speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_bad_grid(capsys):
    assert main(["bench", "--hidden", "0", "--no-plot"]) == 2
    assert "--hidden must be >= 1" in capsys.readouterr().err


def test_progress_is_plain_lines_in_a_log_and_under_ci(monkeypatch, capsys):
    from paraseq import cli

    monkeypatch.setenv("CI", "true")
    for i in range(3):
        cli._progress(i, 2, f"step {i}")
    err = capsys.readouterr().err
    assert err.splitlines() == ["[0/2] step 0", "[1/2] step 1", "[2/2] step 2"]
    assert "\r" not in err


def test_progress_is_a_tqdm_bar_on_a_terminal(monkeypatch):
    pytest.importorskip("tqdm")
    import io

    from paraseq import cli

    class Tty(io.StringIO):
        def isatty(self):
            return True

    term = Tty()
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys, "stderr", term)
    for i in range(3):
        cli._progress(i, 2, f"step {i}")
    text = term.getvalue()
    assert "\r" in text and "2/2" in text and "step 2" in text
    assert cli._BAR is None  # closed at i == n
