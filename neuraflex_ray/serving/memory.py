"""Retrieval memories a served LM reads per request (kNN-LM, neuraflex_ray/memory/): a request for
model `base+NAME` (or `base:ADAPTER+NAME`) gets the mixture of the LM's distribution and datastore
NAME's, with the gate fitted when the datastore was built (its gate.json; the adaptive one by default,
so a store that holds nothing near the context steps aside). Each index is loaded once per replica.
Each query is searched on its own, so a request's distribution never depends on its batch-mates.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from neuraflex_ray.checkpoint import fingerprint
from neuraflex_ray.memory.heldout import GATE_FILE
from neuraflex_ray.memory.mixing import Gate, knn_log_probs, mix_log_probs, nearest
from neuraflex_ray.memory.store import Datastore, read_datastore_manifest

GATE_KINDS = ("adaptive", "fixed")


def check_datastores(datastores: dict[str, str], lm_exports: list[str]) -> None:
    """Each datastore must hold the keys of one of the served LMs: refused before any replica starts."""
    prints = {fingerprint(p): p for p in lm_exports}
    for name, path in datastores.items():
        m = read_datastore_manifest(path)
        if m["export_fingerprint"] not in prints:
            raise ValueError(f"datastores.{name}: {path} was built by the export {m['export']} (fingerprint "
                             f"{m['export_fingerprint']}), and no served LM is that export (served: "
                             f"{', '.join(f'{p} = {f}' for f, p in prints.items())}); build one with "
                             f"`neuraflex-ray datastore build --export <served export> ...`")
        if not (Path(path) / GATE_FILE).is_file():
            raise ValueError(f"datastores.{name}: {path} has no {GATE_FILE} (built before gates were fitted at build "
                             f"time): rebuild it with `neuraflex-ray datastore build`")


class Memories:
    """The datastores built for one served export, by name."""

    def __init__(self, export: Path, datastores: dict[str, str], index: str = "flat", gate: str = "adaptive"):
        if gate not in GATE_KINDS:
            raise ValueError(f"datastore_gate: {gate!r}; use one of {list(GATE_KINDS)}")
        mine = fingerprint(export)
        ours = {n: p for n, p in datastores.items() if read_datastore_manifest(p)["export_fingerprint"] == mine}
        self.stores = {n: Datastore(p, index) for n, p in ours.items()}
        self.gates = {n: Gate(**json.loads((Path(p) / GATE_FILE).read_text())[gate]) for n, p in ours.items()}
        self.index, self.gate_kind = index, gate

    def names(self) -> list[str]:
        return sorted(self.stores)

    def card(self, name: str) -> dict:
        m = self.stores[name].manifest
        return {"corpus": m["corpus"], "entries": m["entries"], "index": self.index, "k": self.stores[name].k,
                "gate": {"kind": self.gate_kind, **self.gates[name].as_dict()}, "path": str(self.stores[name].path)}

    def mix(self, name: str, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Rows [n, V] of the LM's logits -> log-probs of the mixture with store `name`, each row searched on
        its own; hidden [n, D] are the LM's final normalised hidden states at those rows."""
        store, gate = self.stores[name], self.gates[name]
        n = store.search(hidden.float().cpu().numpy(), per_row=True)
        lm = torch.log_softmax(logits.double().cpu(), dim=-1)
        mixed = mix_log_probs(lm, [(knn_log_probs(n, gate.temperature, lm.shape[-1]), gate.logit(nearest(n)))])
        return mixed.to(device=logits.device, dtype=torch.float32)
