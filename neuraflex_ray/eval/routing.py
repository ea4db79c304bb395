"""Expert specialisation: which kinds of held-out token go to which expert (`neuraflex-ray inspect`).

Runs the export on the dataset's held-out blocks (the dropless local path, evaluation routing),
records every MoE layer's top-k choice per token, labels each token by kind (`token_kinds.py`:
Python lexical classes for code, word classes for prose) and writes to the output directory:

    routing.json   per layer: for each kind, its token count and P(expert | kind); the layer's load;
                   the mean routing entropy per token; top-1 agreement with the next MoE layer
    routing.md     the same as Markdown tables
    routing.png    a heatmap of P(expert | kind) per layer (matplotlib, Agg backend)

Agreement across layers: expert numbers mean nothing from one layer to the next, so beside the share
of tokens whose top-1 expert number is the same in layers l and l+1 (and what independent choices
with the same loads would give) we report the normalised mutual information of the two top-1
choices: 0 when layer l's choice says nothing about layer l+1's, 1 when it decides it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuraflex_ray.eval.token_kinds import kind_names, kinds_for, token_kinds
from neuraflex_ray.models.moe import MoE


def _entropy_bits(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def normalised_mutual_information(a: np.ndarray, b: np.ndarray, num_experts: int) -> float:
    """I(A;B) / sqrt(H(A) H(B)) of two discrete label arrays (0 when either is constant)."""
    joint = np.zeros((num_experts, num_experts))
    np.add.at(joint, (a, b), 1)
    joint /= joint.sum()
    ha, hb = _entropy_bits(joint.sum(1)), _entropy_bits(joint.sum(0))
    if ha == 0 or hb == 0:
        return 0.0
    return (ha + hb - _entropy_bits(joint.ravel())) / math.sqrt(ha * hb)


@torch.no_grad()
def route_tokens(model: torch.nn.Module, blocks: np.ndarray, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Top-k experts [layers, N, k] and routing entropies in bits [layers, N] for every token of `blocks`."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    if not layers:
        raise ValueError("this export has no MoE layers (model.num_experts=0): nothing is routed")
    seen: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in layers]

    def hook(i: int):
        def record(module: MoE, args: tuple[torch.Tensor, ...]) -> None:
            r = module.route(args[0].reshape(-1, args[0].shape[-1]))
            ent = -(r.probs * r.probs.clamp_min(1e-12).log2()).sum(-1)
            seen[i].append((r.experts, ent))
        return record

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(layers)]
    try:
        model.eval()
        for i in range(0, len(blocks), batch_size):
            model(torch.from_numpy(blocks[i:i + batch_size].astype(np.int64)))
    finally:
        for h in handles:
            h.remove()
    experts = np.stack([torch.cat([e for e, _ in s]).numpy() for s in seen])
    entropy = np.stack([torch.cat([h for _, h in s]).numpy() for s in seen])
    return experts, entropy


def specialisation(experts: np.ndarray, entropy: np.ndarray, kinds: list[str], kind_names: tuple[str, ...],
                   num_experts: int) -> dict[str, Any]:
    """The table: per layer and kind, P(expert | kind) over the kind's top-k assignments."""
    labels = np.array(kinds)
    layers = []
    for li in range(experts.shape[0]):
        per_kind = {}
        for kind in kind_names:
            rows = experts[li][labels == kind]
            if rows.size == 0:
                continue
            share = np.bincount(rows.ravel(), minlength=num_experts) / rows.size
            per_kind[kind] = {"tokens": int(rows.shape[0]), "expert_share": share.round(4).tolist()}
        load = np.bincount(experts[li].ravel(), minlength=num_experts) / experts[li].size
        row: dict[str, Any] = {"layer": li, "kinds": per_kind, "load": load.round(4).tolist(),
                               "routing_entropy_bits": float(entropy[li].mean()),
                               "max_entropy_bits": math.log2(num_experts)}
        if li + 1 < experts.shape[0]:
            a, b = experts[li][:, 0], experts[li + 1][:, 0]
            pa, pb = (np.bincount(x, minlength=num_experts) / len(x) for x in (a, b))
            row["next_layer_top1"] = {"same_expert": float((a == b).mean()), "same_expert_if_independent": float(pa @ pb),
                                      "nmi": normalised_mutual_information(a, b, num_experts)}
        layers.append(row)
    return {"num_experts": num_experts, "tokens": len(kinds), "layers": layers}


def to_markdown(table: dict[str, Any]) -> str:
    e = table["num_experts"]
    lines = [f"Expert specialisation on {table['tokens']:,} held-out tokens ({table['kinds']}): P(expert | kind) "
             f"over each kind's top-{table['top_k']} assignments; 1/E = {1 / e:.3f} is no preference.", ""]
    for layer in table["layers"]:
        lines += [f"### MoE layer {layer['layer']}: routing entropy {layer['routing_entropy_bits']:.2f} of "
                  f"{layer['max_entropy_bits']:.2f} bits" + (
                      f"; top-1 same as next layer {layer['next_layer_top1']['same_expert']:.2f} (independent "
                      f"{layer['next_layer_top1']['same_expert_if_independent']:.2f}), NMI "
                      f"{layer['next_layer_top1']['nmi']:.3f}" if "next_layer_top1" in layer else ""), "",
                  "| kind | tokens | " + " | ".join(f"expert {i}" for i in range(e)) + " |",
                  "| --- | ---: |" + " ---: |" * e]
        for kind, v in layer["kinds"].items():
            lines.append(f"| {kind} | {v['tokens']:,} | " + " | ".join(f"{s:.3f}" for s in v["expert_share"]) + " |")
        lines.append("| (all) | | " + " | ".join(f"{s:.3f}" for s in layer["load"]) + " |")
        lines.append("")
    return "\n".join(lines)


def heatmap(table: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = table["layers"]
    kinds = list(layers[0]["kinds"])
    fig, axes = plt.subplots(1, len(layers), figsize=(2.2 + 1.1 * table["num_experts"] * len(layers), 0.45 * len(kinds) + 1.6),
                             squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=True):
        m = np.array([layer["kinds"][k]["expert_share"] if k in layer["kinds"] else [np.nan] * table["num_experts"]
                      for k in kinds])
        im = ax.imshow(m, vmin=0, vmax=min(1.0, 3 / table["num_experts"]), cmap="viridis", aspect="auto")
        ax.set_title(f"MoE layer {layer['layer']}")
        ax.set_xticks(range(table["num_experts"]))
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(kinds)))
        ax.set_yticklabels(kinds if ax is axes[0][0] else [])
    fig.colorbar(im, ax=axes[0].tolist(), label="P(expert | kind)")
    fig.suptitle(f"Where each kind of held-out token is routed ({table['kinds']}, top-{table['top_k']})")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def inspect_export(export_dir: str | Path, data_dir: str | Path, out_dir: str | Path, kinds: str = "auto",
                   max_blocks: int = 256) -> dict[str, Any]:
    """Route held-out text through an LM export; write routing.json / .md / .png into out_dir."""
    from neuraflex_ray.checkpoint import load_exported
    from pipelines.text import load_text_datasets, load_tokenizer, read_blocks

    model, meta = load_exported(export_dir)
    if not any(isinstance(m, MoE) for m in model.modules()):
        raise ValueError(f"not a routed MoE export (model_type {meta['model_type']}, no MoE layers); inspect routes "
                         f"an MoE LM's tokens")
    _, val_ds, manifest = load_text_datasets(str(data_dir))
    if kinds == "auto":
        kinds = kinds_for(manifest)
    blocks = read_blocks(val_ds)[:max_blocks, :-1]
    tok = load_tokenizer(Path(export_dir) / "tokenizer.json")
    labels: list[str] = []
    for row in blocks:
        labels += token_kinds([tok.decode([int(t)], skip_special_tokens=False) for t in row], kinds)
    experts, entropy = route_tokens(model, blocks)
    table = specialisation(experts, entropy, labels, kind_names(kinds),
                           model.cfg.num_experts)
    table.update(kinds=kinds, top_k=model.cfg.top_k, router=model.cfg.router, export=str(export_dir))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "routing.json").write_text(json.dumps(table, indent=2))
    (out / "routing.md").write_text(to_markdown(table))
    heatmap(table, out / "routing.png")
    return {**table, "files": [str(out / f) for f in ("routing.json", "routing.md", "routing.png")]}
