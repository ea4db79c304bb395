"""The models a Serve replica holds: an LM with its engine and tokenizer, or a NeuroFM predictor.

`resolve_models` checks export directories before any replica starts; `load_model` loads one
export onto the replica's device the way its family says (`Family.load_served`: `load_lm` for a
family that `serves` "openai", `load_series` for "series"). The routes that use them are in
`serving/app.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neuraflex_ray.checkpoint import export_family, fingerprint, load_exported, read_adapter_meta, read_export_meta
from neuraflex_ray.models.moe_lm import param_counts
from neuraflex_ray.serving import openai_api as oai
from neuraflex_ray.serving.engine import LMEngine
from neuraflex_ray.serving.errors import RequestError
from neuraflex_ray.serving.quantize import MODES as QUANT_MODES
from pipelines.text import EOS, load_tokenizer

OPENAI, SERIES = "openai", "series"  # what a family serves (`Family.serves`): the routes its models take


@dataclass
class LMModel:
    name: str
    path: Path
    meta: dict[str, Any]
    engine: LMEngine
    tokenizer: Any
    eos: int | None
    tokenizer_class: str = "ByteLevelBPETokenizer (Hugging Face tokenizers)"
    token_unit: str = "token"  # what one id is (the BLT's: a byte)

    @property
    def context(self) -> int:
        return self.engine.max_len

    def encode(self, prompt: str | list[int], field: str) -> list[int]:
        vocab = self.engine.vocab_size
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt).ids
        else:
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise RequestError(f"{field}: token ids must be in [0, {vocab}), got {bad[:5]}", field)
            ids = list(prompt)
        ids = ids or ([self.eos] if self.eos is not None else [])  # an empty prompt starts a new document
        if not ids:
            raise RequestError(f"{field} must not be empty", field)
        if len(ids) >= self.context:
            raise RequestError(f"{field} is {len(ids)} tokens; this model's context window is {self.context} tokens "
                               f"and generation needs at least one more: shorten it", field,
                               code="context_length_exceeded")
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def adapter_names(self) -> list[str]:
        return self.engine.adapters.names() if self.engine.adapters is not None else []

    def datastore_names(self) -> list[str]:
        return self.engine.memories.names() if self.engine.memories is not None else []

    def card(self) -> dict[str, Any]:
        cfg = self.engine.model.cfg
        return {"model_type": self.meta["model_type"], "config": self.meta["model"], "context_length": cfg.max_seq_len,
                "parameters": param_counts(cfg), "tokenizer": {"vocab_size": self.tokenizer.get_vocab_size(),
                                                               "eos": EOS if self.eos is not None else None},
                "chat_template": oai.apply_chat_template([{"role": "user", "content": "{content}"}]),
                "calibration": self.meta.get("calibration"),
                "serving": {"max_batch_size": self.engine.max_batch_size, "kv_cache": self.engine.kv_cache,
                            "batch_invariant": self.engine.batch_invariant,
                            "quantization": self.meta.get("quantization"),
                            "speculative": self.engine.speculator.report() if self.engine.speculator else None,
                            "datastores": self.datastore_names(),
                            "device": str(self.engine.device), "dtype": str(self.engine.model.output.weight.dtype)}}


@dataclass
class NeuroModel:
    name: str
    path: Path
    meta: dict[str, Any]
    predictor: Any  # neuro.NeuroPredictor

    def card(self) -> dict[str, Any]:
        from neuraflex_ray.serving.neuro import card

        return card(self.meta)


def resolve_models(models: dict[str, str] | list[str] | str) -> dict[str, Path]:
    """{name: export dir}; a bare path (or list of them) is named after its model type."""
    if isinstance(models, str):
        models = [models]
    if isinstance(models, dict):
        out = {name: Path(p).expanduser().resolve() for name, p in models.items()}
        for path in out.values():
            read_export_meta(path)  # checks it is an export
    else:
        out = {}
        for p in models:
            path = Path(p).expanduser().resolve()
            name = default_name(path)
            if name in out:
                raise ValueError(f"models: two {name} exports; give them names ({{name: path}})")
            out[name] = path
    if not out:
        raise ValueError("models: give at least one export directory")
    return out


def default_name(path: Path) -> str:
    """What Serve calls an export it was not given a name for: its family's `serve_name`."""
    return export_family(path).serve_name


def serves(path: str | Path) -> str:
    """Which routes an export's models take: its family's `serves` ("openai", "series" or "")."""
    return export_family(path).serves


def replica_device(device: str) -> str:
    """The torch device a replica runs on: `auto` is its GPU when it has one."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


@dataclass
class ServeOptions:
    """How a replica runs its LMs: the Serve config's `args` (beside `models`) and `neuraflex-ray serve` flags."""

    max_batch_size: int = 16  # KV-cache slots of the continuous-batching engine; 1 turns batching off
    kv_cache: bool = True
    device: str = "auto"  # auto: the replica's GPU if it has one
    batch_invariant: bool = True  # a request's text never depends on its batch-mates
    quantize: str = ""  # "" (full precision) | int8 | int4: weight-only (serving/quantize.py)
    speculative: str = ""  # "" | ngram | draft | both: speculative decoding (serving/speculative.py)
    draft: str = ""  # the draft model's export (same tokenizer), for speculative: draft | both
    num_speculative_tokens: int = 4  # k: tokens drafted per verify step
    adapters: dict[str, str] = dataclasses.field(default_factory=dict)  # {name: adapter dir} (serving/adapters.py)
    datastores: dict[str, str] = dataclasses.field(default_factory=dict)  # {name: datastore dir} (serving/memory.py)
    datastore_index: str = "flat"  # which of each datastore's indexes is searched: flat | ivfpq | hnsw
    datastore_gate: str = "adaptive"  # adaptive | fixed: which of the gates fitted at build
    dispatch: bool = False  # offer `<base>:auto`: a first pass picks the adapter (serving/dispatch.py)

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> ServeOptions:
        """Checked before any replica starts: each problem names its key and the fix (ValueError)."""
        known = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ValueError(f"serve args: unknown key {unknown[0]!r}; known: {sorted(known)}")
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in args:
                v = args[f.name]
                want = type(f.default if f.default is not dataclasses.MISSING else f.default_factory())
                if want is bool and not isinstance(v, bool) or want is not bool and isinstance(v, bool):
                    raise ValueError(f"serve args: {f.name} must be a {want.__name__}, got {v!r}")
                try:
                    values[f.name] = want(v)
                except (TypeError, ValueError):
                    raise ValueError(f"serve args: {f.name} must be a {want.__name__}, got {v!r}") from None
        o = cls(**values)
        if o.quantize not in ("", *QUANT_MODES):
            raise ValueError(f"quantize: {o.quantize!r}; use int8, int4 or leave it empty (full precision)")
        if o.speculative not in ("", "ngram", "draft", "both"):
            raise ValueError(f"speculative: {o.speculative!r}; use ngram, draft, both or leave it empty (off)")
        if o.speculative in ("draft", "both") and not o.draft:
            raise ValueError(f"speculative: {o.speculative} needs draft: the export directory of a draft model")
        if o.draft and o.speculative not in ("draft", "both"):
            raise ValueError("draft is set but speculative is not draft or both: set speculative: draft (or both)")
        if o.speculative and not o.kv_cache:
            raise ValueError("speculative decoding verifies drafts against the KV cache: set kv_cache: true")
        if o.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {o.num_speculative_tokens}")
        for name, path in o.adapters.items():
            if ":" in name or not (Path(path).expanduser() / "adapter.json").is_file():
                raise ValueError(f"adapters.{name}: {path} is not an adapter directory (adapter.safetensors + "
                                 f"adapter.json, from `neuraflex-ray finetune` with finetune.method=lora), or the "
                                 f"name has a ':'")
        o.adapters = {n: str(Path(p).expanduser().resolve()) for n, p in o.adapters.items()}
        for name, path in o.datastores.items():
            if any(c in name for c in ":+") or not (Path(path).expanduser() / "manifest.json").is_file():
                raise ValueError(f"datastores.{name}: {path} is not a datastore directory (manifest.json, from "
                                 f"`neuraflex-ray datastore build`), or the name has a ':' or '+'")
        o.datastores = {n: str(Path(p).expanduser().resolve()) for n, p in o.datastores.items()}
        if o.datastore_index not in ("flat", "ivfpq", "hnsw"):
            raise ValueError(f"datastore_index: {o.datastore_index!r}; use flat, ivfpq or hnsw")
        if o.datastore_gate not in ("adaptive", "fixed"):
            raise ValueError(f"datastore_gate: {o.datastore_gate!r}; use adaptive or fixed")
        if o.datastores and o.speculative:
            raise ValueError("datastores and speculative decoding do not combine yet (the verifier scores drafts "
                             "with the LM alone): serve them in separate applications")
        if o.draft:
            o.draft = str(Path(o.draft).expanduser().resolve())
            if serves(o.draft) != OPENAI:
                raise ValueError(f"draft: {o.draft} is not an LM export")
        return o


def check_draft(draft: Path, target: Path) -> None:
    """A draft model must speak the target's tokens: the same tokenizer, token for token."""
    a, b = load_tokenizer(draft / "tokenizer.json").get_vocab(), load_tokenizer(target / "tokenizer.json").get_vocab()
    if a != b:
        raise ValueError(f"draft: {draft} uses another tokenizer than {target} ({len(a)} vs {len(b)} tokens, "
                         f"{len(set(a.items()) ^ set(b.items()))} entries differ): train the draft on the same "
                         f"dataset build (data.tokenizer) as the target")


def load_model(name: str, path: Path, options: ServeOptions | None = None) -> LMModel | NeuroModel:
    """One export on the replica's device, loaded the way its family serves it."""
    return export_family(path).load_served(name, path, options or ServeOptions())


def load_series(name: str, path: Path, options: ServeOptions) -> NeuroModel:
    """A time-series foundation model behind /v1/neuro/embed and /forecast."""
    from neuraflex_ray.serving.neuro import NeuroPredictor

    model, meta = load_exported(path, device=replica_device(options.device))
    return NeuroModel(name, path, meta, NeuroPredictor(model, meta))


def load_lm(name: str, path: Path, options: ServeOptions) -> LMModel:
    """An LM behind the OpenAI routes: its continuous-batching engine, quantised, speculative and with
    adapters as `options` say."""
    o, dev = options, replica_device(options.device)
    model, meta = load_exported(path, device=dev)
    if dev.startswith("cuda"):
        _to_bf16(model)
    if o.quantize:
        from neuraflex_ray.serving.quantize import quantize_model

        meta = {**meta, "quantization": quantize_model(model, o.quantize)}
    tok = load_tokenizer(path / "tokenizer.json")
    # Token confidence is reported under the temperature fitted on held-out text at export (1.0 for
    # an export made before calibration existed: the raw distribution).
    temperature = float(meta.get("calibration", {}).get("temperature", 1.0))
    engine = LMEngine(model, o.max_batch_size, o.kv_cache, o.batch_invariant, calibration_temperature=temperature,
                      speculator=_speculator(o, path, model, dev), adapters=_adapters(o, path, model),
                      memories=_memories(o, path))
    return LMModel(name, path, meta, engine, tok, tok.token_to_id(EOS))


def _adapters(o: ServeOptions, path: Path, model: torch.nn.Module) -> Any:
    """The adapters trained on this export (matched by fingerprint), attached to its model."""
    if not o.adapters:
        return None
    from neuraflex_ray.serving.adapters import AdapterSet

    mine = fingerprint(path)
    ours = {n: p for n, p in o.adapters.items()
            if read_adapter_meta(p)["base_fingerprint"] == mine}
    if not ours:
        return None
    adapters = AdapterSet(model, path, ours, base_print=mine)
    if o.dispatch:
        adapters.enable_dispatch(_dispatcher(path, model, ours))
    return adapters


def _dispatcher(path: Path, model: torch.nn.Module, adapters: dict[str, str]) -> Any:
    """The classifier behind `<base>:auto`, fitted on the base's and each adapter's training data."""
    from neuraflex_ray.serving.dispatch import fit_for_adapters

    data = {}
    for name, adapter in adapters.items():
        if "data_dir" not in (meta := read_adapter_meta(adapter)):
            raise ValueError(f"dispatch: adapters.{name} ({adapter}) does not record its training data (an adapter "
                             f"from before dispatch existed); fine-tune it again or serve without dispatch")
        data[name] = meta["data_dir"]
    return fit_for_adapters(model, read_export_meta(path)["data"]["output_dir"], data)


def _memories(o: ServeOptions, path: Path) -> Any:
    """The datastores built for this export (matched by fingerprint)."""
    if not o.datastores:
        return None
    from neuraflex_ray.serving.memory import Memories

    memories = Memories(path, o.datastores, o.datastore_index, o.datastore_gate)
    return memories if memories.names() else None


def check_adapters(adapters: dict[str, str], lm_exports: list[str]) -> None:
    """Each adapter must belong to one of the served LMs: refused before any replica starts."""
    prints = {fingerprint(p): p for p in lm_exports}
    for name, path in adapters.items():
        base = read_adapter_meta(path)["base_fingerprint"]
        if base not in prints:
            raise ValueError(f"adapters.{name}: {path} was trained on base {base}, and no served LM is that export "
                             f"(served: {', '.join(f'{p} = {f}' for f, p in prints.items())})")


def _to_bf16(model: torch.nn.Module) -> None:
    # Decode is memory-bound: bf16 weights, half the bytes per step. Parameters only: the rotary
    # tables stay fp32 (in bf16 an angle at position 2000 keeps ~3 digits).
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)


def _speculator(o: ServeOptions, path: Path, model: torch.nn.Module, dev: str) -> Any:
    if not o.speculative:
        return None
    from neuraflex_ray.serving.speculative import Speculator

    draft = None
    if o.draft:
        check_draft(Path(o.draft), path)
        draft, _ = load_exported(o.draft, device=dev)
        if draft.cfg.max_seq_len < model.cfg.max_seq_len:
            raise ValueError(f"draft: {o.draft} has a {draft.cfg.max_seq_len}-token context, shorter than the "
                             f"target's {model.cfg.max_seq_len}: use a draft trained with model.max_seq_len >= it")
        if dev.startswith("cuda"):
            _to_bf16(draft)
    return Speculator(o.num_speculative_tokens, draft, o.max_batch_size, ngram=o.speculative in ("ngram", "both"))
