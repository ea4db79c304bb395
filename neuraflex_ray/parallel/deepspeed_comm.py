"""DeepSpeed's communication backend, as training here uses it.

When DeepSpeed's comm backend starts on the CPU accelerator it JIT-compiles `deepspeed_shm_comm`, a
shared-memory all-reduce, with the machine's C++ compiler: about 40 s on 2 cores, and again for every
virtualenv path (a fresh clone, a worktree) and whenever two environments alternate in the build cache.
Only DeepSpeed's `inference_all_reduce` uses that op, and nothing here calls it: the training collectives
go through torch.distributed (gloo on CPU, NCCL on GPU). `skip_shm_allreduce` marks the op unavailable
for this process before the backend starts, so the build never runs.
"""

from __future__ import annotations

SHM_OP = "deepspeed_shm_comm"  # DeepSpeed's ShareMemCommBuilder.NAME


def skip_shm_allreduce() -> None:
    """Call in each process before its first DeepSpeed collective (DeepSpeed keeps the probe's result in
    one module-level dict, so the edit holds for the process)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_OP] = False
