"""NeuraFlex-Ray: train, tune and serve Mixture-of-Experts LMs and neural-data foundation models on Ray.

The package is layered; a unit (a sub-package, a top-level module, or `pipelines/` beside the
package) imports only units of the layers below its own, never above and never beside:

    atomic, console, local_ray      small utilities: atomic writes, what reaches the console, starting a local Ray
    config                          the job config and its sections; the model-family interface and registry
    models                          the models, free of any parallelism
    parallel, pipelines             DeepSpeed expert parallelism; the Ray Data pipelines
    checkpoint                      every on-disk format: training checkpoints, exports, adapter files
    memory                          retrieval memories an LM reads (kNN-LM): datastores, FAISS indexes, mixing
    train                           the Train loop, its task interface, the strategies, the driver
    finetune                        LoRA, EWC, and the hooks a family's task plugs them in with
    eval, tune                      held-out evaluation beside baselines; Ray Tune sweeps
    interpret                       looking inside trained models: representation comparisons
    serving                         the Ray Serve applications
    families                        the model families: each glues its model, data, task, export, eval, serving
    workflows, dashboard, sweep     stages chained for users; sweep dashboards; an old path kept for --resume
    cli                             the `neuraflex-ray` command line
    __main__                        `python -m neuraflex_ray`

A lower layer that needs a family's knowledge asks the registry (`config.get_family`), which
imports the family's module by name when it is first looked up. `tests/test_layers.py` checks every
import against `LAYERS`.
"""

LAYERS: tuple[tuple[str, ...], ...] = (
    ("atomic", "console", "local_ray"),
    ("config",),
    ("models",),
    ("parallel", "pipelines"),
    ("checkpoint",),
    ("memory",),
    ("train",),
    ("finetune",),
    ("eval", "tune"),
    ("interpret",),
    ("serving",),
    ("families",),
    ("workflows", "dashboard", "sweep"),
    ("cli",),
    ("__main__",),
)
