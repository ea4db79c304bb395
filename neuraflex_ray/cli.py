"""`neuraflex-ray` command line: data | train | export | eval | probe | inspect | generate | tune | dashboard |
finetune | merge | serve | quickstart. `python -m neuraflex_ray ...` is the same.

Every command that takes --config also takes dotted overrides after it, e.g.

    neuraflex-ray train --config jobs/configs/moe_debug.yaml train.max_steps=50 model.top_k=1

A usage or config error prints one line naming the flag or field and exits 2. By default the console
shows our progress lines, warnings and errors, and library chatter goes to <run dir>/logs/library.log
(neuraflex_ray/console.py). `--verbose` (before the command) shows both the chatter and tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from neuraflex_ray.config import BUILTIN, DEFAULT_MODEL_TYPE, ConfigError, JobConfig, get_family, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"
# `--model <alias>` without --config: the built-in family's small config.
DEFAULT_CONFIGS = {b.alias: CONFIGS / b.debug_config for b in BUILTIN.values()}
DEFAULT_CONFIG = CONFIGS / BUILTIN[DEFAULT_MODEL_TYPE].debug_config
DEFAULT_SWEEP = CONFIGS / "tune_moe_debug.yaml"


def _config(args: argparse.Namespace) -> JobConfig:
    alias = getattr(args, "model", None)
    default = DEFAULT_CONFIGS[alias] if alias else DEFAULT_CONFIG
    path = args.config or (default if default.is_file() else None)
    return load_config(path, args.overrides)


def cmd_data(args: argparse.Namespace) -> dict:
    from neuraflex_ray.train.driver import ensure_ray

    cfg = _config(args)
    ensure_ray(cfg)
    return get_family(cfg.model_type).build_data(cfg.data, force=args.force)


def cmd_train(args: argparse.Namespace) -> dict:
    from neuraflex_ray.train.driver import train

    out = train(_config(args), fresh=args.fresh)
    out.pop("history", None)
    out.pop("batch_fingerprints", None)
    print(f"[train] done: {out['steps']} steps, checkpoint {out['checkpoint']}, TensorBoard {out['run_dir']}/tensorboard")
    return out


def cmd_export(args: argparse.Namespace) -> dict:
    from neuraflex_ray.checkpoint import export_checkpoint
    from neuraflex_ray.train.driver import latest_checkpoint

    cfg = _config(args)
    ckpt = latest_checkpoint(args.checkpoint or cfg.run_dir)
    if ckpt is None:
        raise ConfigError(f"--checkpoint: no complete checkpoint under {args.checkpoint or cfg.run_dir}; run train first")
    out = export_checkpoint(ckpt, Path(cfg.data.output_dir).resolve(), args.out or cfg.run_dir / "export")
    return {"export": str(out), "checkpoint": str(ckpt)}


def cmd_eval(args: argparse.Namespace) -> dict:
    from neuraflex_ray.workflows import evaluate_export

    cfg = _config(args)
    return evaluate_export(args.export or cfg.run_dir / "export", Path(cfg.data.output_dir).resolve())


def _export_meta(arg: str) -> tuple[Path, dict]:
    """--export DIR: the directory and its config.json, or a ConfigError saying what to pass."""
    from neuraflex_ray.checkpoint import read_export_meta

    export = Path(arg).expanduser()
    try:
        return export, read_export_meta(export)
    except FileNotFoundError as e:
        raise ConfigError(f"--export {arg}: {e}") from None


def cmd_probe(args: argparse.Namespace) -> dict:
    from neuraflex_ray.eval.probe import format_table, probe, write_result

    export, _ = _export_meta(args.export)
    try:
        result = probe(export, cache_dir=args.cache_dir, hop_s=args.hop_s)
    except ConfigError as e:
        raise ConfigError(f"--export {args.export}: {e}") from None
    print(format_table(result), flush=True)
    if args.fewshot:  # LoRA fine-tuning on 1, 5 and 25 windows per class, beside the frozen probe on as many
        from neuraflex_ray.eval.fewshot import fewshot

        result = {**result, "fewshot": fewshot(export, cache_dir=args.cache_dir)}
        for task, r in result["fewshot"].items():
            for k, row in r["shots"].items():
                print(f"[probe] {task} few-shot {k}/class: LoRA {row['lora']:.3f} | linear probe {row['linear']:.3f} "
                      f"({row['draws']} draws, {r['n_test']} test windows)", flush=True)
    if args.out:
        print(f"[probe] wrote {write_result(result, args.out)}", flush=True)
    return result


def cmd_inspect(args: argparse.Namespace) -> dict:
    from neuraflex_ray.eval.routing import inspect_export

    export, meta = _export_meta(args.export)
    data = args.data or meta.get("data", {}).get("output_dir")
    if not data or not (Path(data) / "manifest.json").is_file():
        raise ConfigError(f"--data: no text dataset at {data!r}; pass the data.output_dir the export was trained on")
    try:
        out = inspect_export(export, data, args.out or export / "inspect", kinds=args.kinds, max_blocks=args.max_blocks)
    except ValueError as e:  # an export without routed MoE layers
        raise ConfigError(f"--export {args.export}: {e}") from None
    print((Path(out["files"][1])).read_text(), flush=True)
    return {k: out[k] for k in ("kinds", "tokens", "router", "files")}


def cmd_generate(args: argparse.Namespace) -> dict:
    from neuraflex_ray.checkpoint import export_family

    text = export_family(args.export).generate_text(Path(args.export), args.prompt, args.max_tokens, args.temperature,
                                                    args.top_k, args.top_p, args.seed)
    return {"prompt": args.prompt, "completion": text}


def cmd_finetune(args: argparse.Namespace) -> dict:
    from neuraflex_ray.finetune.run import finetune

    cfg = load_config(args.config, [*args.overrides, f"finetune.from_export={args.from_export}"])
    return finetune(cfg, fresh=args.fresh)


def cmd_merge(args: argparse.Namespace) -> dict:
    from neuraflex_ray.finetune.run import merge_adapter

    try:
        out = merge_adapter(args.base, args.adapter, args.out)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    return {"export": str(out)}


def cmd_dashboard(args: argparse.Namespace) -> dict:
    import time

    from neuraflex_ray.dashboard import start, stop

    servers = start(args.sweep_dir, args.host, args.tensorboard_port, args.optuna_port)
    print(f"[dashboard] TensorBoard: {servers['tensorboard']} | Optuna: {servers['optuna']} (Ctrl-C stops both)",
          flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while all(p.poll() is None for p in servers["processes"]):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        stop(servers)
    return {"tensorboard": servers["tensorboard"], "optuna": servers["optuna"], "stopped": True}


def cmd_quickstart(args: argparse.Namespace) -> dict:
    from neuraflex_ray.train.driver import ensure_ray
    from neuraflex_ray.workflows import quickstart

    cfg = _config(args)
    ensure_ray(cfg)
    return quickstart(cfg)


def cmd_tune(args: argparse.Namespace) -> dict:
    from neuraflex_ray.tune import load_sweep, run_sweep

    # `ray job stop` sends SIGTERM: stop the way Ctrl-C does (Tune saves its state on SIGUSR1 too),
    # so --resume continues from the latest state.
    signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGUSR1))
    if args.resume and args.fresh:
        raise ConfigError("--resume and --fresh contradict each other: --resume continues a sweep, --fresh deletes it")
    return run_sweep(load_sweep(args.config or DEFAULT_SWEEP, args.overrides), resume=args.resume, fresh=args.fresh)


def cmd_serve(args: argparse.Namespace) -> dict:
    import time

    from ray import serve

    from neuraflex_ray.serving.deploy import deploy, parse_checkpoints
    from neuraflex_ray.train.driver import ensure_ray

    try:
        models = parse_checkpoints(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    ensure_ray()
    bad = [a for a in args.adapter if "=" not in a]
    if bad:
        raise ConfigError(f"--adapter {bad[0]}: give NAME=DIR (requests then ask for model <base>:NAME)")
    serving = {"quantize": args.quantize, "speculative": args.speculative, "draft": args.draft,
               "num_speculative_tokens": args.num_speculative_tokens,
               "adapters": dict(a.split("=", 1) for a in args.adapter)}
    try:  # every serving option and a draft's tokenizer, checked before Serve starts
        from neuraflex_ray.serving.app import bind_app

        bind_app({"models": models, "kv_cache": not args.no_kv_cache, **serving})
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    url = deploy(models, host=args.host, port=args.port, name=args.name, max_batch_size=args.max_batch_size,
                 kv_cache=not args.no_kv_cache, num_replicas=args.replicas, num_cpus=args.num_cpus,
                 num_gpus=args.num_gpus, batch_invariant=not args.no_batch_invariant,
                 proxy_location=args.proxy_location, **serving)
    print(f"[serve] {args.name} is up at {url}: GET {url}/v1/models, POST {url}/v1/completions "
          f"(OpenAI client: base_url={url}/v1)", flush=True)
    if args.no_block:
        return {"url": url, "app": args.name}
    # `ray job stop` sends SIGTERM: leave the same way as Ctrl-C, taking the app down with us.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(args.name)
        print(f"[serve] {args.name} deleted", flush=True)
    return {"url": url, "app": args.name, "stopped": True}


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
    sp.add_argument("--from", dest="from_export", required=True, metavar="EXPORT", help="the export to fine-tune")
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
    sp = with_config("export", "Convert the latest sharded checkpoint into one consolidated safetensors export.")
    sp.add_argument("--checkpoint", help="run directory or checkpoint directory (default: the config's run dir)")
    sp.add_argument("--out", help="export directory (default: <run dir>/export)")
    sp.set_defaults(fn=cmd_export)
    sp = with_config("eval", "Evaluate an export on held-out data beside its baselines, in one process.")
    sp.add_argument("--export", help="export directory (default: <run dir>/export)")
    sp.set_defaults(fn=cmd_eval)
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
    except ConfigError as e:
        if args.verbose:
            raise
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2, default=str))
    return 130 if out.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
