"""The model families, each a plug-in (the interface and the registry: `neuraflex_ray/config/family.py`).

    moe_lm/    NeuralFlex-MoE: a decoder-only MoE language model on DeepSpeed expert parallelism
    neurofm/   NeuroFM: a multimodal foundation model for neural and physiological series on FSDP2

Each folder holds the family object (`FAMILY`), its config checks and its Train task; the model
code itself is parallelism-free in `neuraflex_ray/models/`, the data pipelines in `pipelines/`. A
family outside the package is named in a job YAML by its import path (`model_type:
mypackage.myfamily:FAMILY`); `tests/toy_family.py` is one, defined entirely in the tests.
"""

from neuraflex_ray.config.family import Family, get_family, register_family

__all__ = ["Family", "get_family", "register_family"]
