"""What each `neuraflex-ray` command does (the parser in `cli/__init__.py` maps flags to these)."""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

from neuraflex_ray.config import BUILTIN, DEFAULT_MODEL_TYPE, ConfigError, JobConfig, get_family, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"
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
    from neuraflex_ray.checkpoint import export_checkpoint, export_family
    from neuraflex_ray.train.driver import latest_checkpoint

    cfg = _config(args)
    if args.export:
        if args.format != "hf":
            raise ConfigError("--export converts an existing export, which only --format hf does; drop --export")
        export, meta = _export_meta(args.export)  # a clear line when it is not an export
        out = get_family(meta["model_type"]).export_hf(export, Path(args.out or cfg.run_dir / "hf"))
        return {"hf": str(out), "export": args.export}
    ckpt = latest_checkpoint(args.checkpoint or cfg.run_dir)
    if ckpt is None:
        raise ConfigError(f"--checkpoint: no complete checkpoint under {args.checkpoint or cfg.run_dir}; run train first")
    if args.format != "hf":
        out = export_checkpoint(ckpt, Path(cfg.data.output_dir).resolve(), args.out or cfg.run_dir / "export")
        return {"export": str(out), "checkpoint": str(ckpt)}
    with tempfile.TemporaryDirectory(dir=cfg.run_dir) as tmp:  # our export of it, which hf converts
        export = export_checkpoint(ckpt, Path(cfg.data.output_dir).resolve(), Path(tmp) / "export")
        out = export_family(export).export_hf(export, Path(args.out or cfg.run_dir / "hf"))
    return {"hf": str(out), "checkpoint": str(ckpt)}


def cmd_eval(args: argparse.Namespace) -> dict:
    from neuraflex_ray.workflows import evaluate_export

    cfg = _config(args)
    export = Path(args.export or cfg.run_dir / "export")
    out = evaluate_export(export, Path(cfg.data.output_dir).resolve())
    if args.datastore:
        from neuraflex_ray.cli.datastore import knn_eval

        out["knn"] = knn_eval(export, args.datastore, args.index)
    return out


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

    start = f"finetune.from_export={args.from_export}" if args.from_export else f"finetune.from_hf={args.from_hf}"
    cfg = load_config(args.config, [*args.overrides, start])
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
    for flag, items, ask in (("--adapter", args.adapter, "<base>:NAME"), ("--datastore", args.datastore, "<base>+NAME")):
        bad = [a for a in items if "=" not in a]
        if bad:
            raise ConfigError(f"{flag} {bad[0]}: give NAME=DIR (requests then ask for model {ask})")
    access: dict[str, Any] = {"api_key_file": args.api_key_file} if args.api_key_file else {}
    for item in args.access:
        name, _, value = item.partition("=")
        if not value:
            raise ConfigError(f"--access {item}: give LIMIT=VALUE, e.g. requests_per_minute=60")
        access[name] = value.lower() == "true" if name == "protect_health" else int(value) if value.isdigit() else value
    serving = {"access": access, "quantize": args.quantize, "speculative": args.speculative, "draft": args.draft,
               "num_speculative_tokens": args.num_speculative_tokens,
               "adapters": dict(a.split("=", 1) for a in args.adapter), "dispatch": args.dispatch,
               "datastores": dict(a.split("=", 1) for a in args.datastore), "datastore_index": args.datastore_index}
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
