"""Every rank-to-rank call ds_quant makes, in one place.

    reducers        weight statistics over the ranks holding the rest of a tensor (conversion time)
    inference_all_reduce   DeepSpeed's own allreduce of a row-parallel output (shm on CPU, NCCL on GPU)
    all_gather_objects / broadcast_object / barrier / all_reduce_sum
    agree           one error, the same on every rank, instead of one rank failing and the others hanging
    guard_shm_allreduce    DeepSpeed 0.19's CPU shm allreduce on ranks spread over several nodes
    shutdown        the orderly end of a wrapped job

Every function is a no-op (or the identity) without an initialised process group, so single-process runs
take the same code paths. torch.distributed and DeepSpeed are imported inside the functions: importing
ds_quant imports neither.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable
from typing import TypeVar

from ..errors import DsQuantError, RankError
from ..log import current_rank

T = TypeVar("T")

SHM_BUFFERS = "/dev/shm/deepspeed_allreduce_buffer_*"
LOCAL = "local"  # as a group: this process alone (a model that is not tensor-parallel); nothing is sent


def initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def group_size(group=None) -> int:
    """Ranks in `group` (None: the default group; LOCAL: 1)."""
    if group is LOCAL or not initialized():
        return 1
    import torch.distributed as dist

    return dist.get_world_size(group=group)


def group_rank(group=None) -> int:
    if group is LOCAL or not initialized():
        return 0
    import torch.distributed as dist

    return dist.get_rank(group=group)


def barrier(group=None) -> None:
    if group_size(group) > 1:
        import torch.distributed as dist

        dist.barrier(group=group)


def all_gather_objects(obj: T, group=None) -> list[T]:
    """Every rank's `obj`, in group-rank order (pickled; no shared filesystem needed)."""
    if group_size(group) == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * dist.get_world_size(group=group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: T, src: int = 0, group=None) -> T:
    """`obj` of group rank `src` on every rank of `group`."""
    if group_size(group) == 1:
        return obj
    import torch.distributed as dist

    box = [obj if group_rank(group) == src else None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, src) if group is not None else src, group=group)
    return box[0]


def all_reduce_sum(t, group=None):
    """Sum of `t` over `group`, in place; `t` itself when there is no group."""
    if group_size(group) > 1:
        import torch.distributed as dist

        dist.all_reduce(t, group=group)
    return t


def all_gather_last_dim(t, sizes, group=None):
    """Every rank's (..., sizes[r]) slice, concatenated in rank order along the last dim: (..., sum(sizes)),
    float32 (bf16 values exactly). Slices may be uneven (DeepSpeed's partition sizes): each is padded to the
    largest for the collective and trimmed after. `t` itself (float32) when there is no group."""
    import torch

    if group_size(group) == 1:
        return t.float()
    import torch.distributed as dist

    width = max(sizes)
    padded = torch.nn.functional.pad(t.float(), (0, width - t.shape[-1])).contiguous()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[..., :n] for p, n in zip(parts, sizes, strict=True)], dim=-1)


def agree(fn: Callable[[], T], group=None, what: str = "") -> T:
    """Run `fn` on every rank of `group` and agree on the outcome before anyone goes on.

    If `fn` raised on any rank, every rank raises the same `RankError` naming the failing ranks and the first
    failing rank's message (`what` says what was being done), so no rank is left waiting in a later collective
    and no gloo/NCCL traceback is the last thing a user reads. Otherwise each rank gets its own result. Alone
    (one rank), `fn`'s own exception propagates unchanged. Collective over `group`: every rank must call it.
    """
    if group_size(group) == 1:
        return fn()
    try:
        result, failure = fn(), None
    except Exception as e:  # noqa: BLE001 - the point is to carry any failure to every rank
        result, failure = None, _one_line(e)

    outcomes = all_gather_objects((current_rank(), failure), group)
    failed = [(r, f) for r, f in outcomes if f is not None]
    if failed:
        ranks = ", ".join(str(r) for r, _ in failed)
        first_rank, first = failed[0]
        if len(failed) == 1:
            where = f"rank {first_rank}"
        elif all(f == first for _, f in failed):
            where = f"ranks {ranks}"
        else:
            where = f"ranks {ranks} (rank {first_rank} says)"
        raise RankError(f"{what + ': ' if what else ''}{where}: {first}")
    return result


def _one_line(e: BaseException) -> str:
    """Our errors are self-explanatory; anything else keeps its type name."""
    msg = str(e)
    if isinstance(e, DsQuantError):
        return msg
    return f"{type(e).__name__}: {msg}"


# -- DeepSpeed's comm ---------------------------------------------------------------------------------------
def reducers(group, sharded: bool):
    """(max, sum) of a tensor over `group` (copies; the argument is untouched), or the identity for both when
    the statistic is whole on every rank."""
    if not sharded or group is None or group_size(group) == 1:
        return _identity, _identity
    import torch.distributed as dist

    def reduce(op):
        def run(t):
            t = t.clone()
            dist.all_reduce(t, op=op, group=group)
            return t

        return run

    return reduce(dist.ReduceOp.MAX), reduce(dist.ReduceOp.SUM)


def _identity(t):
    return t


def inference_all_reduce(y, group):
    """DeepSpeed's own inference allreduce (shm on CPU, NCCL on GPU) in `y`'s dtype, as its layers call it."""
    from deepspeed import comm
    from deepspeed.comm import pg_utils

    if not pg_utils.is_parallel(group):  # the same test DeepSpeed's layers make
        return y
    y = y.contiguous()
    comm.inference_all_reduce(y, group=group)
    return y


def shm_allreduce_usable(local_size: str | None, world_size: int) -> bool:
    """DeepSpeed's CPU shm allreduce sets itself up only when every rank is on this node."""
    return local_size is not None and local_size.isdigit() and int(local_size) == world_size


def guard_shm_allreduce() -> None:
    """DeepSpeed 0.19 on CPU calls its shm allreduce even when it skipped setting it up (ranks on several
    nodes) and segfaults; there, make `inference_all_reduce` take its own torch.distributed fallback."""
    from deepspeed.comm import comm

    cdb = comm.cdb
    if getattr(cdb, "shm_comm_op", None) is not None and not shm_allreduce_usable(os.environ.get("LOCAL_SIZE"),
                                                                                 cdb.get_world_size()):
        cdb.shm_vector_kernel_level = 0


def own_shm_buffers() -> list[str]:
    """This rank's DeepSpeed CPU allreduce buffer in /dev/shm (`<prefix>_<uid>_<addr>_<port>_<rank>`, 69 MB,
    which DeepSpeed 0.19 creates and never unlinks)."""
    if not initialized():
        return []
    import torch.distributed as dist

    name = (f"{SHM_BUFFERS[:-1]}{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    return [p for p in glob.glob(glob.escape(name)) if os.path.isfile(p)]


def shutdown() -> None:
    """End a job that succeeded in order, while the interpreter is still whole.

    1. barrier: no rank exits (and gets the job killed) while another still writes or communicates;
    2. unlink this rank's shm allreduce buffer (every rank has mapped every other rank's by now, and a mapping
       outlives its name), so a finished job leaves nothing in /dev/shm;
    3. destroy the process groups. Left to interpreter finalisation, a gloo worker thread that still holds the
       last collective's work can try to take the GIL from a finalising interpreter: the thread is torn down
       and the process aborts with "terminate called without an active exception" after a run that succeeded.
    Only for success: after an error, ranks may be in different places and a barrier would hang.
    """
    if not initialized():
        return
    import torch.distributed as dist

    dist.barrier()
    for path in own_shm_buffers():
        try:
            os.unlink(path)
        except OSError:
            pass  # another job's cleanup got there first
    dist.destroy_process_group()


def talk_group(group, world: int):
    """The TP group to talk over; `dist.LOCAL` (no communication) for a model that is not tensor-parallel."""
    return group if world > 1 else LOCAL
