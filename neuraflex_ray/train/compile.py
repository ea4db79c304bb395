"""`train.compile: true`: torch.compile each repeated block in place, as torchtitan does.

Compiling per block rather than the whole model keeps graphs small and reusable: the blocks of a
list share one forward code object, so Dynamo traces one graph and reuses it for every block whose
shapes match (parameters are graph inputs). Compiling in place (`nn.Module.compile`) leaves the
state-dict keys unchanged, so checkpoints and exports do not depend on the flag. The strategies
call this before wrapping (FSDP2's `fully_shard`, DeepSpeed's engine), as torchtitan orders it.

What it is worth on CPU for the debug flavours is measured in benchmarks/RESULTS.md ("train.compile").
"""

from __future__ import annotations

from torch import nn

# The block lists of our models: MoELM.layers, NeuroFM.cross_blocks and NeuroFM.blocks.
BLOCK_LISTS = ("layers", "cross_blocks", "blocks")


def compile_blocks(model: nn.Module, backend: str = "inductor") -> int:
    """Compile every block of the model's block lists in place; returns how many were compiled."""
    n = 0
    for attr in BLOCK_LISTS:
        blocks = getattr(model, attr, None)
        if isinstance(blocks, nn.ModuleList):
            for block in blocks:
                block.compile(backend=backend)
                n += 1
    if n == 0:
        raise ValueError(f"train.compile: {type(model).__name__} has none of the block lists {BLOCK_LISTS}; "
                         "set train.compile=false")
    return n
