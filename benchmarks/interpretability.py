"""Interpretability, measured (issue 29): the SAE's figures, and whether the representation comparisons
are right and say something about the runs this system produces.

    neuraflex-ray activations --export runs/quickstart/export --site resid_1 --out data/activations/resid_1
    neuraflex-ray sae --activations data/activations/resid_1           # -> runs/sae-resid_1
    neuraflex-ray activations --export runs/quickstart-neurofm/export --site latents --out data/activations/neurofm-latents
    neuraflex-ray sae --activations data/activations/neurofm-latents data.val_fraction=0.3 model.expansion=4
    python benchmarks/interpretability.py [--sae runs/sae-resid_1] [--base runs/quickstart/export]
                                          [--sae-neurofm runs/sae-latents] [--stages ...] [--out runs/bench-interp]

Stages (each writes <out>/<stage>.json and is reused on a rerun unless --fresh):
  sae         the SAE run's evaluation (summary.json of `neuraflex-ray sae`)
  invariance  a rotated, isotropically scaled and shifted copy of real activations: CKA 1, Procrustes 0
  seeds       the quickstart config trained with seeds 0, 1, 2 (checkpoints every 50 steps, 8 kept);
              for each pair, does every site's best CKA match in the other seed have its name (16 sites:
              attn, ffn, resid, moe_in x 4 layers; chance 1/16)? CCA's rate beside it, both directions
  drift       seed 0's 8 checkpoints: mean CKA over sites to the final checkpoint, by step
  moe_vs_dense  the dense baseline (same active width) trained like seed 0: CKA to the MoE at every
              shared site, beside MoE seed 0 against MoE seed 1
  forgetting  8 fine-tuning variants of the base on KJV (benchmarks/continual.py's methods and EWC lambdas,
              same data, seed and steps): how far each moved (1 - CKA to the base, mean over sites) against
              its forgetting (rise in the base's held-out bits/byte); Spearman

Prints {"sae": {"lm": {...}, "neurofm": ...}, "compare": {"invariance_ok", "layer_id_acc": {"cka", "cca",
"chance"}, "drift": [{"step", "cka_to_final"}], "forgetting_spearman"}}. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
LM_KEYS = ("site", "d_in", "n_latents", "k", "explained_variance", "pca_explained_variance", "l0", "dead_frac",
           "ce_clean", "ce_sae", "ce_zero", "ce_loss_score", "concept_latents", "concept_neurons", "concept_random")
# methods x EWC strength, as in the continual table (benchmarks/continual.py), plus stronger and weaker lambdas
VARIANTS = {
    "full": ["finetune.method=full", "finetune.ewc_lambda=0"],
    "ewc_100": ["finetune.method=full", "finetune.ewc_lambda=100"],
    "ewc_500": ["finetune.method=full", "finetune.ewc_lambda=500"],
    "ewc_2000": ["finetune.method=full", "finetune.ewc_lambda=2000"],
    "ewc_10000": ["finetune.method=full", "finetune.ewc_lambda=10000"],
    "lora": ["finetune.method=lora", "finetune.ewc_lambda=0"],
    "lora_ewc_500": ["finetune.method=lora", "finetune.ewc_lambda=500"],
    "lora_ewc_10000": ["finetune.method=lora", "finetune.ewc_lambda=10000"],
}


def log(msg: str) -> None:
    print(f"[interpretability] {msg}", file=sys.stderr, flush=True)


def _sae_eval(run: str) -> dict[str, Any]:
    from neuraflex_ray.config import get_family

    export = Path(run) / "export"
    if not (export / "model.safetensors").is_file():
        sys.exit(f"{run}: no SAE export there; run `neuraflex-ray sae --activations DIR` first")
    ev = get_family("sae").evaluate(export, Path(_data_dir(export)))
    return {k: v for k, v in ev.items() if k not in ("report", "rows")} | {"eval_rows": ev["rows"]}


def stage_sae(args: argparse.Namespace) -> dict[str, Any]:
    lm = _sae_eval(args.sae)
    out: dict[str, Any] = {"lm": {k: lm[k] for k in LM_KEYS}, "lm_more": {k: v for k, v in lm.items() if k not in LM_KEYS}}
    if args.sae_neurofm:
        out["neurofm"] = _sae_eval(args.sae_neurofm)  # recon_* and forecast_* in place of ce_*
    return out


def _sample(base: Path, tokens: int) -> Any:
    from neuraflex_ray.interpret.compare import sample_rows

    return sample_rows(base, tokens)


def stage_invariance(args: argparse.Namespace) -> dict[str, Any]:
    from scipy.stats import ortho_group

    from neuraflex_ray.interpret.compare import site_activations
    from neuraflex_ray.interpret.similarity import linear_cka, procrustes_distance

    sample = _sample(Path(args.base), args.tokens)
    x = site_activations(args.base, sample, ["resid_1"])["resid_1"].astype(np.float64)
    y = 2.5 * x @ ortho_group.rvs(x.shape[1], random_state=0) + 1.0
    cka, proc = linear_cka(x, y), procrustes_distance(x, y)
    return {"cka": cka, "procrustes": proc, "ok": abs(cka - 1) < 1e-6 and proc < 1e-6, "tokens": len(sample.rows),
            "procrustes_inputs": "each centred and scaled to unit Frobenius norm"}


def _train(name: str, overrides: list[str], out: Path) -> Path:
    from neuraflex_ray.config import load_config
    from neuraflex_ray.train.driver import train

    cfg = load_config(REPO / "jobs" / "configs" / "moe_debug.yaml", [f"name={name}", f"output_dir={out}", *overrides])
    if not (cfg.run_dir / "done").is_file():
        train(cfg, fresh=True)
        (cfg.run_dir / "done").write_text("ok")
    return cfg.run_dir


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    out = []
    for p in sorted((run_dir / "checkpoints").rglob("train_state.json")):
        out.append((json.loads(p.read_text())["step"], p.parent))
    return sorted(out)


def _export(ckpt: Path, data: str, out: Path) -> Path:
    from neuraflex_ray.checkpoint import export_checkpoint

    if not (out / "model.safetensors").is_file():
        export_checkpoint(ckpt, data, out)
    return out


def _data_dir(export: Path) -> str:
    return json.loads((export / "config.json").read_text())["data"]["output_dir"]


def stage_seeds(args: argparse.Namespace) -> dict[str, Any]:
    from neuraflex_ray.interpret.compare import compare_activations, identify_sites, site_activations
    from neuraflex_ray.interpret.similarity import cca

    out = Path(args.out)
    data = _data_dir(Path(args.base))
    exports = {}
    for s in SEEDS:
        run = _train(f"interp-seed-{s}", [f"train.seed={s}", "train.checkpoint_every=50", "train.eval_every=50",
                                          "train.num_to_keep=8"], out / "runs")
        exports[s] = _export(_checkpoints(run)[-1][1], data, out / "exports" / f"seed-{s}")
        log(f"seed {s}: {exports[s]}")
    sample = _sample(exports[0], args.tokens)
    acts = {s: site_activations(e, sample) for s, e in exports.items()}
    pairs = []
    for i, a in enumerate(SEEDS):
        for b in SEEDS[i + 1:]:
            for x, y in ((a, b), (b, a)):
                table = compare_activations(acts[x], acts[y], all_measures=False)
                cca_m = [[cca(acts[x][p], acts[y][q]) for q in table["sites_b"]] for p in table["sites_a"]]
                pairs.append({"a": x, "b": y, **identify_sites(table, cca_m),
                              "cka_same_site_mean": float(np.mean(np.diag(table["cka_matrix"])))})
                log(f"seeds {x} -> {y}: {pairs[-1]}")
    return {"pairs": pairs, "sites": len(acts[0]), "tokens": len(sample.rows),
            "layer_id_acc": {k: float(np.mean([p[k] for p in pairs])) for k in ("cka", "cca", "chance")}}


def stage_moe_vs_dense(args: argparse.Namespace) -> dict[str, Any]:
    """The dense baseline (model.num_experts=0: a SwiGLU of the MoE's active width) trained like seed 0,
    against the MoE seed 0 at every shared site, beside MoE seed 0 against MoE seed 1."""
    from neuraflex_ray.interpret.compare import site_activations
    from neuraflex_ray.interpret.similarity import linear_cka

    out = Path(args.out)
    data = _data_dir(Path(args.base))
    run = _train("interp-dense-seed-0", ["train.seed=0", "model.num_experts=0", "train.ep_size=1"], out / "runs")
    dense = _export(_checkpoints(run)[-1][1], data, out / "exports" / "dense-seed-0")
    moe = {s: out / "exports" / f"seed-{s}" for s in (0, 1)}
    sample = _sample(moe[0], args.tokens)
    a = {s: site_activations(e, sample) for s, e in moe.items()}
    d = site_activations(dense, sample)
    shared = [s for s in a[0] if s in d]
    per_site = {s: {"moe_vs_dense": linear_cka(a[0][s], d[s]), "moe_vs_moe_seed": linear_cka(a[0][s], a[1][s])}
                for s in shared}
    return {"sites": per_site, "mean_moe_vs_dense": float(np.mean([v["moe_vs_dense"] for v in per_site.values()])),
            "mean_moe_vs_moe_seed": float(np.mean([v["moe_vs_moe_seed"] for v in per_site.values()]))}


def stage_drift(args: argparse.Namespace) -> dict[str, Any]:
    from neuraflex_ray.interpret.compare import site_activations
    from neuraflex_ray.interpret.similarity import linear_cka

    out = Path(args.out)
    run = out / "runs" / "interp-seed-0"
    ckpts = _checkpoints(run)
    data = _data_dir(Path(args.base))
    exports = [(step, _export(c, data, out / "exports" / f"drift-{step}")) for step, c in ckpts]
    sample = _sample(exports[-1][1], args.tokens)
    final = site_activations(exports[-1][1], sample)
    drift = []
    for step, e in exports:
        acts = site_activations(e, sample)
        drift.append({"step": step, "cka_to_final": float(np.mean([linear_cka(acts[s], final[s]) for s in final]))})
        log(f"drift: {drift[-1]}")
    values = [d["cka_to_final"] for d in drift]
    return {"drift": drift, "checkpoints": len(drift), "monotonic": bool(np.all(np.diff(values) > 0))}


def stage_forgetting(args: argparse.Namespace) -> dict[str, Any]:
    from scipy.stats import spearmanr

    from neuraflex_ray.checkpoint import load_exported
    from neuraflex_ray.config import load_config
    from neuraflex_ray.eval.lm import bits_per_byte, heldout_loss
    from neuraflex_ray.finetune.run import finetune, merge_adapter
    from neuraflex_ray.finetune.setup import finetune_config
    from neuraflex_ray.interpret.compare import site_activations
    from neuraflex_ray.interpret.similarity import linear_cka
    from pipelines.text import build_text_dataset, load_text_datasets, read_blocks

    base = Path(args.base).resolve()
    config = REPO / "jobs" / "configs" / "finetune_kjv.yaml"
    common = [f"output_dir={Path(args.out).resolve() / 'finetune'}", f"finetune.from_export={base}",
              f"train.max_steps={args.finetune_steps}", "train.checkpoint_every=50", "train.eval_every=50"]
    build_text_dataset(finetune_config(load_config(config, common)).data)
    old = load_text_datasets(_data_dir(base))
    old_blocks, old_bpt = read_blocks(old[1]), old[2]["val_bytes_per_token"]

    def old_bpb(model: Any) -> float:
        return bits_per_byte(heldout_loss(model, old_blocks), old_bpt)

    sample = _sample(base, args.tokens)
    base_acts = site_activations(base, sample)
    base_bpb = old_bpb(load_exported(base)[0])
    variants = {}
    for name, extra in VARIANTS.items():
        out = finetune(load_config(config, [*common, f"name=interp-{name}", *extra]), fresh=True)
        export = merge_adapter(base, Path(out["adapter"]), Path(out["adapter"]).parent / "merged") \
            if "adapter" in out else Path(out["export"])
        acts = site_activations(export, sample)
        moved = 1 - float(np.mean([linear_cka(base_acts[s], acts[s]) for s in base_acts]))
        variants[name] = {"moved": moved, "forgetting": old_bpb(load_exported(export)[0]) - base_bpb}
        log(f"{name}: {variants[name]}")
    moved = [v["moved"] for v in variants.values()]
    forgot = [v["forgetting"] for v in variants.values()]
    return {"variants": variants, "steps": args.finetune_steps, "base_old_bpb": base_bpb,
            "spearman": float(spearmanr(moved, forgot).statistic)}


STAGES = {"sae": stage_sae, "invariance": stage_invariance, "seeds": stage_seeds, "drift": stage_drift,
          "moe_vs_dense": stage_moe_vs_dense, "forgetting": stage_forgetting}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sae", default="runs/sae-resid_1", help="the run directory `neuraflex-ray sae` wrote")
    p.add_argument("--sae-neurofm", default="", help="the same for an SAE on NeuroFM activations (e.g. runs/sae-latents)")
    p.add_argument("--base", default="runs/quickstart/export", help="the LM export the variants fine-tune")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    p.add_argument("--tokens", type=int, default=2048, help="held-out tokens per comparison")
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--out", default="runs/bench-interp")
    p.add_argument("--fresh", action="store_true", help="recompute stages whose JSON exists")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from neuraflex_ray.train.driver import ensure_ray

    results: dict[str, Any] = {}
    with contextlib.redirect_stdout(sys.stderr):  # Ray's and training's progress; stdout is the JSON
        ensure_ray(None)
        for name in args.stages:
            path = out / f"{name}.json"
            if path.is_file() and not args.fresh:
                results[name] = json.loads(path.read_text())
                continue
            log(f"stage {name}")
            results[name] = STAGES[name](args)
            path.write_text(json.dumps(results[name], indent=1))
    compare: dict[str, Any] = {}
    if "invariance" in results:
        compare["invariance_ok"] = results["invariance"]["ok"]
    if "seeds" in results:
        compare["layer_id_acc"] = results["seeds"]["layer_id_acc"]
    if "drift" in results:
        compare["drift"] = results["drift"]["drift"]
        compare["drift_monotonic"] = results["drift"]["monotonic"]
    if "moe_vs_dense" in results:
        compare["moe_vs_dense"] = {k: v for k, v in results["moe_vs_dense"].items() if k.startswith("mean")}
    if "forgetting" in results:
        compare["forgetting_spearman"] = results["forgetting"]["spearman"]
        compare["forgetting_variants"] = results["forgetting"]["variants"]
    print(json.dumps({"sae": results.get("sae"), "compare": compare,
                      "config": {**{k: v for k, v in vars(args).items() if k != "fresh"},
                                 "machine": platform.platform()}}, indent=1))


if __name__ == "__main__":
    main()
