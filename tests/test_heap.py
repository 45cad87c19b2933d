"""paraseq._heap: freed memory kept in the heap during a large solve (glibc), restored after."""

from __future__ import annotations

import threading

import pytest
import torch

import paraseq
from paraseq import _heap


def test_retained_nests_and_restores():
    lib = _heap._glibc()
    with _heap.retained():
        assert _heap._depth == (1 if lib and _heap.ENABLED else 0)
        with _heap.retained():
            big = torch.ones(40 << 18)  # 40 MiB: over glibc's mmap threshold
            assert float(big[-1]) == 1.0
            del big
        assert _heap._depth == (1 if lib and _heap.ENABLED else 0)
    assert _heap._depth == 0
    with _heap.retained(nbytes=1024):  # small: nothing switched
        assert _heap._depth == 0


def test_retained_from_threads():
    errors = []

    def work():
        try:
            for _ in range(20):
                with _heap.retained():
                    torch.ones(1 << 20).sum()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and _heap._depth == 0


def test_solve_is_the_same_with_and_without(monkeypatch):
    cell = torch.nn.GRUCell(4, 16)
    x = torch.randn(4, 3000, 4)
    h0 = torch.zeros(4, 16)
    monkeypatch.setattr(_heap, "MIN_BYTES", 0)
    with torch.no_grad():
        a = paraseq.solve_recurrence(cell, x, h0, method="newton")
        monkeypatch.setattr(_heap, "ENABLED", False)
        b = paraseq.solve_recurrence(cell, x, h0, method="newton")
    assert torch.equal(a, b)


def _wait_inactive(timeout: float) -> bool:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not _heap.active():
            return True
        time.sleep(0.01)
    return not _heap.active()


def test_retention_lingers_after_the_last_solve_then_ends(monkeypatch):
    if not (_heap._glibc() and _heap.ENABLED):
        pytest.skip("glibc's heap only (nothing is switched elsewhere)")
    monkeypatch.setattr(_heap, "LINGER", 0.2)
    with _heap.retained():
        assert _heap.active()
    assert _heap._depth == 0 and _heap.active()  # kept for the next solve
    with _heap.retained():  # a solve within the linger: still on, timer reset
        assert _heap.active()
    assert _heap.active()
    assert _wait_inactive(5.0)  # then glibc's settings come back and the pages are trimmed


def test_release_ends_the_retention_now(monkeypatch):
    if not (_heap._glibc() and _heap.ENABLED):
        pytest.skip("glibc's heap only (nothing is switched elsewhere)")
    monkeypatch.setattr(_heap, "LINGER", 60.0)
    with _heap.retained():
        _heap.release()  # inside a solve: nothing happens
        assert _heap.active()
    assert _heap.active()
    _heap.release()
    assert not _heap.active() and _heap._timer is None


def test_linger_zero_restores_at_exit(monkeypatch):
    monkeypatch.setattr(_heap, "LINGER", 0.0)
    with _heap.retained():
        pass
    assert not _heap.active()


def test_a_forked_child_starts_restored(monkeypatch):
    import os

    if not (_heap._glibc() and _heap.ENABLED) or not hasattr(os, "fork"):
        pytest.skip("glibc's heap and os.fork only")
    monkeypatch.setattr(_heap, "LINGER", 60.0)
    with _heap.retained():
        pass
    assert _heap.active()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its state and leave without running pytest's exit
        os.write(w, b"1" if (not _heap.active() and _heap._depth == 0) else b"0")
        os._exit(0)
    os.close(w)
    got = os.read(r, 1)
    os.waitpid(pid, 0)
    os.close(r)
    _heap.release()
    assert got == b"1"
