"""`neuraflex-ray` command line: data | train | export | eval | datastore | activations | sae | compare | probe | inspect |
generate | tune | dashboard | finetune | merge | serve | quickstart. `python -m neuraflex_ray ...` is the same.

Every command that takes --config also takes dotted overrides after it, e.g.

    neuraflex-ray train --config jobs/configs/moe_debug.yaml train.max_steps=50 model.top_k=1

A usage or config error, or an input file that cannot be used, prints one line naming the flag, the
field or the file (and line) and exits 2. By default the console
shows our progress lines, warnings and errors, and library chatter goes to <run dir>/logs/library.log
(neuraflex_ray/console.py). `--verbose` (before the command) shows both the chatter and tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from neuraflex_ray.cli.commands import (
    DEFAULT_CONFIGS,
    cmd_dashboard,
    cmd_data,
    cmd_eval,
    cmd_export,
    cmd_finetune,
    cmd_generate,
    cmd_inspect,
    cmd_merge,
    cmd_probe,
    cmd_quickstart,
    cmd_serve,
    cmd_train,
    cmd_tune,
)
from neuraflex_ray.cli.datastore import add_datastore_parser
from neuraflex_ray.cli.interpret import add_interpret_parser
from neuraflex_ray.config import BUILTIN, DEFAULT_MODEL_TYPE, ConfigError


class _Parser(argparse.ArgumentParser):
    """A usage error is one line (argparse's default prints the whole usage block first)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="neuraflex-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verbose", action="store_true",
                   help="show library output (DeepSpeed, Ray, torch) on the console and tracebacks of usage errors")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def with_config(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--config", help="job YAML (default: jobs/configs/<model>_debug.yaml)")
        sp.add_argument("--model", choices=sorted(DEFAULT_CONFIGS), default=None,
                        help="which built-in family's debug config to use when --config is not given "
                             f"(default: {BUILTIN[DEFAULT_MODEL_TYPE].alias})")
        sp.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-3")
        return sp

    sp = with_config("data", "Build the model type's Parquet dataset with Ray Data (reused when inputs are unchanged).")
    sp.add_argument("--force", action="store_true", help="rebuild even if the manifest matches")
    sp.set_defaults(fn=cmd_data)
    sp = with_config("train", "Train on Ray Train workers: NeuralFlex-MoE (DeepSpeed ZeRO + expert parallelism) "
                              "or NeuroFM (FSDP2), as the config's model_type says.")
    sp.add_argument("--fresh", action="store_true", help="delete this run's old checkpoints first")
    sp.set_defaults(fn=cmd_train)
    sp = with_config("finetune", "Continue training an export on new data (full, LoRA and/or EWC: the finetune "
                                 "section of the config; neuraflex_ray/finetune/).")
    start = sp.add_mutually_exclusive_group(required=True)
    start.add_argument("--from", dest="from_export", metavar="EXPORT", help="the export to fine-tune")
    start.add_argument("--from-hf", dest="from_hf", metavar="DIR",
                       help="a Hugging Face transformers directory to fine-tune (imported into <run dir>/hf-import)")
    sp.add_argument("--fresh", action="store_true", help="delete this run's old checkpoints first")
    sp.set_defaults(fn=cmd_finetune)
    sp = sub.add_parser("dashboard", help="TensorBoard and optuna-dashboard on a sweep directory; prints both URLs.",
                        description="Starts TensorBoard (one run per trial) and optuna-dashboard (the sweep's study) "
                                    "on a directory `neuraflex-ray tune` wrote, until Ctrl-C.")
    sp.add_argument("sweep_dir", help="the sweep directory (<output_dir>/<name>, e.g. runs/sweeps/tune-moe-debug)")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--tensorboard-port", type=int, default=6006)
    sp.add_argument("--optuna-port", type=int, default=8080)
    sp.set_defaults(fn=cmd_dashboard)
    sp = sub.add_parser("merge", help="Fold a LoRA adapter into its base export: a full export.",
                        description="base export + adapter (adapter.safetensors, adapter.json) -> a full export; "
                                    "refuses an adapter trained on another base.")
    sp.add_argument("--base", required=True, help="the base export the adapter was trained on")
    sp.add_argument("--adapter", required=True, help="the adapter directory (<fine-tune run dir>/adapter)")
    sp.add_argument("--out", required=True, help="where to write the merged export")
    sp.set_defaults(fn=cmd_merge)
    sp = with_config("export", "Convert the latest sharded checkpoint into one consolidated safetensors export "
                               "(--format hf: a Hugging Face transformers directory of a stock architecture).")
    sp.add_argument("--checkpoint", help="run directory or checkpoint directory (default: the config's run dir)")
    sp.add_argument("--export", help="with --format hf: convert this existing export instead of a checkpoint")
    sp.add_argument("--format", choices=("neuraflex", "hf"), default="neuraflex",
                    help="neuraflex: this project's export; hf: AutoModelForCausalLM.from_pretrained loads it")
    sp.add_argument("--out", help="export directory (default: <run dir>/export, or <run dir>/hf with --format hf)")
    sp.set_defaults(fn=cmd_export)
    sp = with_config("eval", "Evaluate an export on held-out data beside its baselines, in one process.")
    sp.add_argument("--export", help="export directory (default: <run dir>/export)")
    sp.add_argument("--datastore", action="append", default=[], metavar="[NAME=]DIR",
                    help="also score held-out bits/byte with this kNN-LM datastore attached (repeatable: each corpus "
                         "with its own and with all; neuraflex_ray/eval/knn_lm.py)")
    sp.add_argument("--index", choices=["flat", "ivfpq", "hnsw"], default="flat", help="which of its indexes to search")
    sp.set_defaults(fn=cmd_eval)
    add_datastore_parser(sub)
    add_interpret_parser(sub)
    sp = sub.add_parser("probe", help="Decode labelled tasks from a NeuroFM export's frozen embeddings, beside classical "
                                      "features.",
                        description="Logistic regression on frozen NeuroFM embeddings vs on classical physiological "
                                    "features, for tasks labelled by the systole recording's own trial onsets; balanced "
                                    "accuracy on the pretraining's held-out part (neuraflex_ray/eval/probe.py).")
    sp.add_argument("--export", required=True, help="NeuroFM export directory written by export/quickstart")
    sp.add_argument("--out", help="also write the JSON result to this file")
    sp.add_argument("--hop-s", type=float, default=1.0, help="seconds between task-vs-rest windows (default 1)")
    sp.add_argument("--fewshot", action="store_true",
                    help="also LoRA-fine-tune on 1, 5 and 25 windows per class (neuraflex_ray/eval/fewshot.py)")
    sp.add_argument("--cache-dir", default="", help="sample package cache (default: ~/.cache/neuraflex-ray)")
    sp.set_defaults(fn=cmd_probe)
    sp = sub.add_parser("inspect", help="Which kinds of held-out token go to which expert, per MoE layer.",
                        description="Route held-out text through a NeuralFlex-MoE export and write P(expert | token kind) "
                                    "per layer (routing.json, routing.md, routing.png heatmap), the routing entropy and "
                                    "cross-layer agreement (neuraflex_ray/eval/routing.py).")
    sp.add_argument("--export", required=True, help="NeuralFlex-MoE export directory written by export/quickstart")
    sp.add_argument("--data", help="the text dataset directory (default: the one the export was trained on)")
    sp.add_argument("--out", help="output directory (default: <export>/inspect)")
    sp.add_argument("--kinds", choices=["auto", "code", "prose"], default="auto",
                    help="token kinds: Python lexical classes or English word classes (auto: code for stdlib)")
    sp.add_argument("--max-blocks", type=int, default=256, help="held-out blocks to route (default 256)")
    sp.set_defaults(fn=cmd_inspect)
    sp = sub.add_parser("generate", help="Generate a completion from an export.",
                        description="Generate a completion from an export (greedy unless --temperature > 0).")
    sp.add_argument("--export", required=True, help="export directory written by export/quickstart")
    sp.add_argument("--prompt", required=True)
    sp.add_argument("--max-tokens", type=int, default=64)
    sp.add_argument("--temperature", type=float, default=0.0)
    sp.add_argument("--top-k", type=int, default=0)
    sp.add_argument("--top-p", type=float, default=1.0)
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(fn=cmd_generate)
    sp = sub.add_parser("tune", help="Hyperparameter sweep: Ray Tune (OptunaSearch + ASHA) over real training runs.",
                        description="Hyperparameter sweep: Ray Tune (OptunaSearch + ASHA by default) over real Ray "
                                    "Train runs; writes results.csv/.parquet, best.yaml and summary.json.")
    sp.add_argument("--config", help="sweep YAML (default: jobs/configs/tune_moe_debug.yaml)")
    sp.add_argument("--resume", action="store_true", help="continue an interrupted sweep; finished trials are kept")
    sp.add_argument("--fresh", action="store_true", help="delete this sweep's directory and Optuna study first")
    sp.add_argument("overrides", nargs="*", help="dotted overrides of the sweep YAML, e.g. num_trials=4 "
                                                 "overrides.train.max_steps=50")
    sp.set_defaults(fn=cmd_tune)
    sp = sub.add_parser("serve", help="Serve exports on Ray Serve: OpenAI-compatible LM API, NeuroFM embed/forecast.",
                        description="Serve exports on Ray Serve (routes in neuraflex_ray/serving/app.py). Runs until "
                                    "Ctrl-C / `ray job stop`, then deletes the app; --no-block leaves it running.")
    sp.add_argument("--checkpoint", action="append", required=True, metavar="[NAME=]DIR",
                    help="an export directory (or a run directory holding export/); repeat for several models")
    sp.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 on a cluster head)")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--name", default="neuraflex", help="Serve application name")
    sp.add_argument("--max-batch-size", type=int, default=16, help="LM decode slots per replica (1: no batching)")
    sp.add_argument("--no-batch-invariant", action="store_true",
                    help="decode only the live rows: faster at low load, text equal up to float rounding")
    sp.add_argument("--no-kv-cache", action="store_true", help="recompute every token (a baseline, not for use)")
    sp.add_argument("--quantize", choices=["int8", "int4"], default="",
                    help="weight-only quantised LM weights (int8 per channel, int4 per group of 32)")
    sp.add_argument("--speculative", choices=["ngram", "draft", "both"], default="",
                    help="speculative decoding: prompt lookup (ngram), a --draft model, or both")
    sp.add_argument("--draft", default="", metavar="DIR", help="the draft model's export (same tokenizer)")
    sp.add_argument("--num-speculative-tokens", type=int, default=4, help="tokens drafted per verify step")
    sp.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                    help="a LoRA adapter of a served LM (`finetune` wrote it); requests pick it as model <base>:NAME")
    sp.add_argument("--dispatch", action="store_true",
                    help="offer model <base>:auto: a first pass over the prompt picks the adapter (or none), with a "
                         "classifier fitted at start-up on the base's and each adapter's training data")
    sp.add_argument("--datastore", action="append", default=[], metavar="NAME=DIR",
                    help="a retrieval memory of a served LM (`datastore build` wrote it); requests pick it as model "
                         "<base>+NAME, or <base>:ADAPTER+NAME with an adapter")
    sp.add_argument("--datastore-index", choices=["flat", "ivfpq", "hnsw"], default="flat",
                    help="which index of each datastore is searched (default flat: exact)")
    sp.add_argument("--api-key-file", default="", metavar="FILE",
                    help="require `Authorization: Bearer <key>` on every route but /health: one key per line, "
                         "optionally followed by a name; re-read when it changes (also: NEURAFLEX_API_KEYS)")
    sp.add_argument("--access", action="append", default=[], metavar="LIMIT=VALUE",
                    help="a per-key limit (serving/access.py): requests_per_minute, tokens_per_minute, "
                         "max_concurrent_streams, max_body_bytes, max_prompt_tokens, protect_health=true")
    sp.add_argument("--replicas", type=int, default=1)
    sp.add_argument("--num-cpus", type=float, default=1, help="CPUs per replica")
    sp.add_argument("--num-gpus", type=float, default=0, help="GPUs per replica (the model then runs on CUDA, bf16)")
    sp.add_argument("--proxy-location", choices=["EveryNode", "HeadOnly"], default="EveryNode",
                    help="where Serve runs HTTP proxies (HeadOnly when several nodes share one machine)")
    sp.add_argument("--no-block", action="store_true", help="return once the app answers (on a running cluster)")
    sp.set_defaults(fn=cmd_serve)
    sp = with_config("quickstart", "Data -> train (2 workers) -> export -> eval (-> generate) -> summary.json; "
                                   "--model neurofm for NeuroFM.")
    sp.set_defaults(fn=cmd_quickstart)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        from neuraflex_ray.console import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"
    try:
        out = args.fn(args)
    except Exception as e:
        err = _config_error(e)
        if err is None or args.verbose:
            raise
        from pipelines.errors import BadInput

        print(f"{'input' if isinstance(err, BadInput) else 'config'} error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2, default=str))
    return 130 if out.get("interrupted") else 0



def _config_error(e: BaseException | None) -> ConfigError | None:
    """The ConfigError (a bad field, a bad input file) behind `e`, also when a Ray task raised it: Ray's
    wrapper is an instance of the same class, but its text carries the remote traceback."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # RayTaskError: what the task itself raised
        if isinstance(cause, BaseException):
            e = cause
        elif isinstance(e, ConfigError):
            return e
        else:
            e = e.__cause__ or e.__context__
    return None
