"""Model families as plug-ins: the interface every family implements, and the registry of them.

A family is one object that knows everything the stages need about one kind of model: its config
sections and their checks, how its data is built and how it sizes the model, how the model is
built, its Train task (batches -> loss and metrics), how the engines shard it, how a checkpoint
becomes an export, how an export is evaluated and served, and how it is fine-tuned. `train/`,
`tune/`, `finetune/`, `serving/`, the workflows and the command line look the family up here by the
config's `model_type` and never name one.

A `model_type` is either a built-in name (the table below; each lives in
`neuraflex_ray/families/<name>/`) or the import path of a family defined anywhere, as
`"package.module:ATTRIBUTE"`: a family in a user's own package (or a test's) is used by writing
that path in the job YAML. Ray Train workers and Serve replicas resolve the same string in their
own processes, so nothing has to be registered there first. `register_family` adds a family under
a short name in the current process (for a notebook; workers would not see it).

This module sits at the bottom of the package (beside the config it serves): it imports nothing
of the package, and a family's own module is imported only when its name is first looked up.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration problem; the message names the field and how to fix it."""


@dataclass(frozen=True)
class Builtin:
    """A family that ships with the package: where it lives, and the command line's short name for it."""

    path: str  # "package.module:ATTRIBUTE" of the Family object
    alias: str  # `quickstart --model <alias>`
    debug_config: str  # its small job YAML under jobs/configs/


BUILTIN: dict[str, Builtin] = {
    "moe_lm": Builtin("neuraflex_ray.families.moe_lm:FAMILY", "moe", "moe_debug.yaml"),
    "neurofm": Builtin("neuraflex_ray.families.neurofm:FAMILY", "neurofm", "neurofm_debug.yaml"),
    "blt": Builtin("neuraflex_ray.families.blt:FAMILY", "blt", "blt_debug.yaml"),
    "sae": Builtin("neuraflex_ray.families.sae:FAMILY", "sae", "sae_debug.yaml"),
}
# A config without model_type, and files written before model_type was recorded in them (DeepSpeed
# checkpoints without train_state.json, exports whose config.json lacks the key), are this family's.
DEFAULT_MODEL_TYPE = "moe_lm"


class Family:
    """The interface of a model family. Subclass it, set the attributes, override what applies.

    A method a family does not support keeps the default here, which raises a ConfigError naming the
    family and the capability, so a user who asks for it is told, in one line, that it does not exist.
    The stages call, in order:

    config:   model_config / data_config / flavours (the YAML's sections), validate
    data:     build_data (a Ray Data job writing Parquet shards and manifest.json with at least
              `train_shards` and `val_shards`), open_data, fit_to_data (model fields the data decides),
              loop_data (what workers need from the manifest)
    train:    task (the Train task: see train/task.py), expert_parallel (DeepSpeed path) or
              shard_units (FSDP2 path), run_summary
    export:   export (a checkpoint -> a consolidated export), evaluate (an export on held-out data,
              beside a baseline fitted on the training split), after_training (what the quickstart
              does with a fresh export); export_hf / import_hf (a stock Hugging Face architecture)
    serve:    serves ("openai": the completions and chat routes; "series": /v1/neuro/*), serve_name,
              load_served, generate_text
    finetune: finetune_methods, lora_targets, finetune_config, fisher_samples
    interpret: activation_sites, and (from `interpret_module`) activation_units / activation_rows /
              site_outputs / activation_labels / spliced_losses / check_comparable
    """

    name: str = ""  # the model_type; filled by the registry for a family named by import path
    model_config: type = type(None)  # dataclass of the `model` section
    data_config: type = type(None)  # dataclass of the `data` section
    flavours: dict[str, dict[str, Any]] = {}  # named presets of the model section (`model.flavour`)
    strategies: tuple[str, ...] = ("fsdp",)  # train.strategy values it trains with
    task_class: Any = None  # its Train task (a train.task.Task subclass); `task()` builds one
    serves: str = ""  # "openai" | "series" | "" (no Serve deployment)
    serve_name: str = "model"  # what Serve calls an export of this family that was not given a name
    finetune_methods: tuple[str, ...] = ("full",)
    lora_targets: tuple[str, ...] = ()  # finetune.lora_targets it accepts (empty: no LoRA)
    flops_convention: str = ""  # how its model FLOPs are counted (the MFU note of a run's summary)
    # The module that collects, labels and splices its activations (functions activation_units(meta, split),
    # activation_rows(model, site, meta, split, start, stop), site_outputs(model, sites, meta, split, units),
    # activation_labels(export, meta, acts), spliced_losses(model, meta), check_comparable(a, b)); imported
    # only when asked. Empty: no interpretability beyond sites.
    interpret_module: str = ""

    def unsupported(self, what: str) -> ConfigError:
        return ConfigError(f"model_type={self.name}: this family has no {what}")

    # ---- config -----------------------------------------------------------------------------
    def validate(self, cfg: Any, world: int) -> None:
        """Raise ConfigError for an impossible combination in the model and data sections."""

    # ---- data -------------------------------------------------------------------------------
    def build_data(self, data: Any, force: bool = False) -> dict[str, Any]:
        """Build (or reuse) the dataset that `data` describes; return its manifest."""
        raise self.unsupported("dataset builder")

    def open_data(self, output_dir: str) -> tuple[Any, Any]:
        """(train, val) Ray Datasets of a built dataset."""
        raise self.unsupported("dataset reader")

    def fit_to_data(self, cfg: Any, manifest: dict[str, Any]) -> Any:
        """The model section with the fields the dataset decides filled in (or checked against it)."""
        return cfg.model

    def loop_data(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """What each Train worker needs from the manifest (handed to `task()` as `loop_data`)."""
        return {"manifest": manifest}

    # ---- train ------------------------------------------------------------------------------
    def build_model(self, model_cfg: Any) -> Any:
        """A fresh model (an nn.Module) of this config, free of any parallelism."""
        raise self.unsupported("model")

    def task(self, cfg: Any, loop_data: dict[str, Any], rank: int) -> Any:
        if self.task_class is None:
            raise self.unsupported("Train task")
        return self.task_class(cfg, loop_data, rank)

    def expert_parallel(self, model: Any, ep_size: int, rank: int) -> Any:
        """DeepSpeed path: the model with its expert layers laid out for `ep_size`-way expert parallelism."""
        return model

    def shard_units(self, model: Any) -> list[Any]:
        """FSDP2 path: the sub-modules to shard as their own units, in order (the root is always one)."""
        return []

    def run_summary(self, cfg: Any) -> dict[str, Any]:
        """Keys a training run's summary adds for this family (e.g. FLOPs per token)."""
        return {}

    # ---- export and evaluation --------------------------------------------------------------
    def export(self, checkpoint: Path, data_dir: Path, out_dir: Path, metadata: dict[str, Any]) -> Path:
        """A training checkpoint -> a consolidated export that `checkpoint.load_exported` reads back
        (`checkpoint.export_consolidated` does it for a family whose export is its weights alone)."""
        raise self.unsupported("export")

    def evaluate(self, export_dir: Path, data_dir: Path) -> dict[str, Any]:
        raise self.unsupported("held-out evaluation")

    def activation_sites(self, model: Any) -> dict[str, Any]:
        """{site name: the sub-module whose output is that site's activation} (`neuraflex-ray activations`,
        interpretability): named so that the same site exists in every model of the family's shape."""
        raise self.unsupported("activation sites")

    def _interpret(self, what: str) -> Any:
        if not self.interpret_module:
            raise self.unsupported(what)
        return importlib.import_module(self.interpret_module)

    def activation_units(self, export: Path, meta: dict[str, Any], split: str) -> int:
        """How many input units (an LM's token blocks, NeuroFM's windows) the split of the export's own
        dataset holds; `activation_rows` reads them by index."""
        return self._interpret("activation collection").activation_units(meta, split)

    def activation_rows(self, model: Any, site: Any, meta: dict[str, Any], split: str, start: int,
                        stop: int) -> dict[str, Any]:
        """The site's output on units [start, stop) as columns: activation [n, d] float32, block (the unit)
        int64, position (within the unit) int32, and what else a reader needs to find the row again."""
        return self._interpret("activation collection").activation_rows(model, site, meta, split, start, stop)

    def site_outputs(self, model: Any, sites: dict[str, Any], meta: dict[str, Any], split: str,
                     units: Any) -> dict[str, Any]:
        """{name: float32 [rows, d]}: each of `sites`' output on the split's units (indices, sorted), in
        unit order, every row of a unit (as `activation_rows` orders them); one forward per batch."""
        return self._interpret("activation collection").site_outputs(model, sites, meta, split, units)

    def check_comparable(self, a: Path, b: Path) -> None:
        """Raise ConfigError when export `b` cannot read the inputs of export `a`'s dataset (`compare`)."""
        self._interpret("representation comparisons").check_comparable(a, b)

    def activation_labels(self, export: Path, meta: dict[str, Any], acts: dict[str, Any]) -> Any:
        """Activation rows (whole units) with a label per row and a description of where it came from
        (interpret/features.py's LabelledRows), for an SAE's features report."""
        return self._interpret("activation labels").activation_labels(export, meta, acts)

    def spliced_losses(self, model: Any, meta: dict[str, Any]) -> dict[str, Any]:
        """{name: a function computing one held-out loss of `model`}: measured clean, with an SAE's
        reconstruction spliced in at a site, and with the site zeroed."""
        return self._interpret("held-out losses for splicing").spliced_losses(model, meta)

    def after_training(self, cfg: Any, result: dict[str, Any], export_dir: Path) -> dict[str, Any]:
        """The quickstart's stages after training and export: {stage: its result} for summary.json."""
        return {"eval": self.evaluate(export_dir, Path(cfg.data.output_dir))}

    # ---- other tools' formats ----------------------------------------------------------------
    def export_hf(self, export_dir: Path, out: Path) -> Path:
        """An export -> a Hugging Face transformers directory of a stock architecture (`export --format hf`)."""
        raise self.unsupported("Hugging Face export")

    def import_hf(self, hf_dir: Path, out: Path) -> Path:
        """A Hugging Face transformers directory -> an export of this family (`finetune --from-hf`)."""
        raise self.unsupported("Hugging Face import")

    # ---- serving ----------------------------------------------------------------------------
    def load_served(self, name: str, path: Path, options: Any) -> Any:
        raise self.unsupported("Serve deployment")

    def generate_text(self, export_dir: Path, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                      top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> str:
        """A completion of `prompt` in this process, without Serve (`neuraflex-ray generate`)."""
        raise self.unsupported("text generation")

    # ---- fine-tuning ------------------------------------------------------------------------
    def finetune_config(self, cfg: Any, export: Path, meta: dict[str, Any]) -> Any:
        """The fine-tune's job config: the export's model section, and what else its data must keep."""
        raise self.unsupported("fine-tuning")

    def fisher_samples(self, data_dir: Path, n: int, rng: Any) -> tuple[list[Any], Any]:
        """EWC: up to n samples of the original training data and the loss of one sample, (samples, loss_of)."""
        raise self.unsupported("EWC Fisher estimate")


_registered: dict[str, Family] = {}


def register_family(family: Family, name: str = "") -> Family:
    """Make `family` known under `name` (default: family.name) in this process."""
    name = name or family.name
    if not name:
        raise ValueError("register_family: give the family a name")
    family.name = name
    _registered[name] = family
    return family


def get_family(model_type: str) -> Family:
    """The family of a `model_type`: registered here, built in, or a "package.module:ATTRIBUTE" path."""
    if model_type in _registered:
        return _registered[model_type]
    path = BUILTIN[model_type].path if model_type in BUILTIN else model_type
    if ":" not in path:
        raise ConfigError(f"model_type: unknown model type {model_type!r}; choose one of {sorted(BUILTIN)} or give "
                          f"a family's import path as package.module:ATTRIBUTE")
    module, _, attr = path.partition(":")
    try:
        family = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"model_type={model_type!r}: cannot import the family ({type(e).__name__}: {e}); the module "
                          f"must be importable where the job runs (installed, or on PYTHONPATH)") from None
    if not isinstance(family, Family):
        raise ConfigError(f"model_type={model_type!r}: {path} is a {type(family).__name__}, not a "
                          f"neuraflex_ray.config.Family")
    return register_family(family, model_type)
