"""paraseq._heap: freed memory kept in the heap during a large solve (glibc), restored after."""

from __future__ import annotations

import threading

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
