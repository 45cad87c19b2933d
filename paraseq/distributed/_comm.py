"""The collectives paraseq.distributed uses, with a failure protocol that never hangs.

Every exchange is an all-gather of one flat buffer per rank whose first entry is a status flag.
A rank whose local work raised still joins the exchange with the flag set (and its payload
zeroed); every rank then sees the flag in the gathered rows, the ranks exchange the error
messages (one ``all_gather_object``, on the failure path only), the failed rank re-raises its
own exception and every other rank raises ``PeerError`` naming it. So a rank that raises makes
every rank raise at the same exchange, instead of leaving the others waiting forever.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Comm", "PeerError"]

# dtype codes for the metadata exchange (a dtype outside the list is code -1)
_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128, torch.bfloat16,
           torch.float16)
_MAX_DIMS = 12


class PeerError(RuntimeError):
    """Another rank of the group failed (raised an exception, or passed inputs that do not fit
    the others'); raised on every rank except the one that failed, which raises its own."""

    def __init__(self, message: str, rank: int):
        super().__init__(message)
        self.rank = rank


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)


class Comm:
    """The group, this rank's place in it and the device collectives run on."""

    def __init__(self, group, where: str, device: torch.device):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                f"paraseq.distributed.{where}: torch.distributed is not initialised; start the "
                f"processes with torchrun (or torch.multiprocessing) and call "
                f"torch.distributed.init_process_group('gloo' or 'nccl') first, or use the "
                f"single-process paraseq.{where}")
        self.group = group
        self.where = where
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        if self.rank < 0:
            raise ValueError(f"paraseq.distributed.{where}: this process is not a member of "
                             f"group {group!r}; call it with a group that holds this rank")
        # NCCL collectives take CUDA tensors; gloo takes CPU (and CUDA) tensors
        backend = dist.get_backend(group)
        if backend == "nccl" and device.type != "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.bytes_sent = 0  # payload bytes this rank contributed (for benchmarks)
        self.exchanges = 0
        self.log: list[tuple[str, int]] = []  # (what, payload bytes) per exchange

    def gather(self, payload: Tensor | None, size: int, dtype: torch.dtype,
               error: BaseException | None = None, what: str = "") -> Tensor:
        """All-gather a flat real ``payload`` of ``size`` entries from every rank: (P, size).

        ``error``: this rank's local work failed; it joins with the flag set, and every rank
        raises (see the module's docstring)."""
        buf = torch.zeros(size + 1, dtype=dtype, device=self.device)
        if error is not None:
            buf[0] = 1
        elif payload is not None and size:
            buf[1:] = payload.reshape(-1).to(device=self.device, dtype=dtype)
        out = torch.empty(self.size, size + 1, dtype=dtype, device=self.device)
        dist.all_gather(list(out.unbind(0)), buf, group=self.group)
        self.bytes_sent += size * buf.element_size()
        self.exchanges += 1
        self.log.append((what, size * buf.element_size()))
        failed = torch.nonzero(out[:, 0] != 0).flatten().tolist()
        if failed:
            self._fail(failed, error, what)
        return out[:, 1:]

    def _fail(self, failed: list[int], error: BaseException | None, what: str):
        msgs: list[object] = [None] * self.size
        text = None if error is None else f"{type(error).__name__}: {error}"
        dist.all_gather_object(msgs, text, group=self.group)
        if error is not None:
            raise error
        first = failed[0]
        where = f" during {what}" if what else ""
        raise PeerError(f"paraseq.distributed.{self.where}: rank {first} of {self.size} failed"
                        f"{where} ({msgs[first]}); every rank raises so that none waits "
                        f"forever", first)

    def check_same(self, fields: dict[str, object], describe, error: BaseException | None = None,
                   lengths: int | None = None) -> list[int]:
        """Every rank's ``fields`` (ints, tuples of ints, dtypes, bools) must equal rank 0's;
        else every rank raises ValueError naming the first rank that differs and what.

        ``describe(rank_fields: dict) -> str`` renders one rank's fields for the message.
        ``lengths``: this rank's time length, gathered too; returns every rank's."""
        enc: list[int] = [0 if lengths is None else int(lengths)]
        layout = []
        for key, v in fields.items():
            if isinstance(v, torch.dtype):
                vals = [_DTYPES.index(v) if v in _DTYPES else -1]
            elif isinstance(v, (tuple, list, torch.Size)):
                if len(v) > _MAX_DIMS:
                    raise ValueError(f"paraseq.distributed.{self.where}: {key} has more than "
                                     f"{_MAX_DIMS} dims ({tuple(v)}); reshape the batch dims")
                vals = [len(v)] + [int(x) for x in v] + [-1] * (_MAX_DIMS - len(v))
            else:
                vals = [int(v)]
            layout.append((key, type(v), len(vals)))
            enc.extend(vals)
        payload = torch.tensor(enc, dtype=torch.float64)  # exact for ints below 2^53
        rows = self.gather(payload, len(enc), torch.float64, error, "the input check")
        rows = rows.to(torch.int64).cpu()
        decoded = [self._decode(r, layout) for r in rows.tolist()]
        for r in range(1, self.size):
            if decoded[r] != decoded[0]:
                keys = [k for k in decoded[0] if decoded[r][k] != decoded[0][k]]
                raise ValueError(
                    f"paraseq.distributed.{self.where}: rank {r} passed {describe(decoded[r])} "
                    f"but rank 0 passed {describe(decoded[0])} ({', '.join(keys)} differ); "
                    f"every rank must pass the same batch dims, sizes, dtype and options, and "
                    f"only its own slice of the time dim")
        return [int(r[0]) for r in rows.tolist()]

    @staticmethod
    def _decode(row: list[int], layout) -> dict[str, object]:
        out: dict[str, object] = {}
        i = 1
        for key, kind, n in layout:
            vals = row[i:i + n]
            i += n
            if kind is torch.dtype:
                out[key] = _DTYPES[vals[0]] if 0 <= vals[0] < len(_DTYPES) else "other"
            elif n > 1:
                out[key] = tuple(vals[1:1 + vals[0]])
            elif kind is bool:
                out[key] = bool(vals[0])
            else:
                out[key] = vals[0]
        return out

    def broadcast(self, t: Tensor, src: int) -> Tensor:
        """Broadcast ``t`` from group rank ``src`` (in place on the others)."""
        buf = t.to(self.device).contiguous()
        dist.broadcast(buf, src=dist.get_global_rank(self.group, src) if self.group is not None
                       else src, group=self.group)
        self.exchanges += 1
        if self.rank == src:
            self.bytes_sent += buf.numel() * buf.element_size()
        return buf.to(t.device)

    def all_max(self, value: float, dtype: torch.dtype = torch.float64) -> float:
        """The largest of every rank's value (nan if any rank's is nan)."""
        rows = self.gather(torch.tensor([value], dtype=dtype), 1, dtype, None, "the residual")
        return float(rows.max()) if not bool(rows.isnan().any()) else float("nan")


def real_view(t: Tensor) -> Tensor:
    """A real tensor with the same bytes (complex: a trailing dim of 2)."""
    return torch.view_as_real(t) if t.is_complex() else t
