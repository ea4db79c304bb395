"""Hugging Face export and import of the LM family (families/moe_lm/hf.py), checked against transformers itself.

Every model here is loaded by `transformers.AutoModelForCausalLM.from_pretrained` without
trust_remote_code, and its logits and greedy tokens are compared with ours on the same weights.
The weights are random (a tiny model, perturbed away from its init so every term matters): the
mapping is under test, not what a model knows; `benchmarks/serve_vs_hf.py` uses the quickstart's.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from neuraflex_ray.checkpoint import load_exported, write_export
from neuraflex_ray.cli import main
from neuraflex_ray.config import ConfigError, ModelConfig, load_config
from neuraflex_ray.families.moe_lm.hf import export_hf, import_hf, refusals
from neuraflex_ray.models.moe_lm import MoELM, generate
from neuraflex_ray.serving.openai_api import apply_chat_template
from pipelines.text import EOS, load_tokenizer, train_bpe

transformers = pytest.importorskip("transformers")  # pinned in requirements.txt: present wherever make test runs

TINY = dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, num_experts=4, top_k=2, expert_ffn_dim=64,
            dense_ffn_dim=128, max_seq_len=96)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE trained the way the text pipeline trains one (on three stdlib modules)."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    texts = [Path(inspect.getsourcefile(m)).read_text() for m in (json, inspect, Path)]
    train_bpe(iter([texts]), TINY["vocab_size"]).save(str(path))
    return path


def _export(tokenizer: Path, out: Path, **overrides) -> Path:
    cfg = ModelConfig(**{**TINY, **overrides})
    torch.manual_seed(0)
    model = MoELM(cfg)
    with torch.no_grad():  # away from the init's symmetric norms and small weights
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return write_export(model.state_dict(), cfg, "moe_lm", out, files={"tokenizer.json": tokenizer})


def _hf_logits_and_greedy(hf_dir: Path, tokens: torch.Tensor, prompt: list[int], n: int) -> tuple[torch.Tensor, list[int]]:
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    gen = transformers.GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), generation_config=gen)
        return model(tokens).logits, out[0, len(prompt):].tolist()


@pytest.mark.parametrize(("overrides", "architecture"), [
    ({}, "MixtralForCausalLM"),
    ({"attn_window": 16, "tie_embeddings": False}, "MixtralForCausalLM"),
    ({"num_experts": 0}, "LlamaForCausalLM"),  # the dense baseline of equal active compute
    ({"num_experts": 0, "attn_window": 16}, "MistralForCausalLM"),
])
def test_export_loads_in_transformers_with_our_logits_and_greedy_tokens(tokenizer, tmp_path, overrides, architecture):
    ours = _export(tokenizer, tmp_path / "ours", **overrides)
    hf_dir = export_hf(ours, tmp_path / "hf")
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == [architecture] and "auto_map" not in config  # stock code, no remote code
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {
        p.name for p in hf_dir.iterdir()}
    model, _ = load_exported(ours)
    tokens = torch.randint(0, TINY["vocab_size"], (3, 90))  # past the window, when there is one
    prompt = tokens[0, :9].tolist()
    hf_logits, hf_greedy = _hf_logits_and_greedy(hf_dir, tokens, prompt, 24)
    with torch.no_grad():
        assert (model(tokens)[0] - hf_logits).abs().max() < 1e-4
    assert generate(model, prompt, 24) == hf_greedy
    # And back: the import is the same model, config and all.
    back, _ = load_exported(import_hf(hf_dir, tmp_path / "back"))
    assert back.cfg == model.cfg
    with torch.no_grad():
        assert torch.equal(back(tokens)[0], model(tokens)[0])


def test_tokenizer_and_chat_template_match_ours(tokenizer, tmp_path):
    hf_dir = export_hf(_export(tokenizer, tmp_path / "ours"), tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ours = load_tokenizer(str(tokenizer))
    sample = Path(inspect.getsourcefile(torch.nn.Module)).read_text()[:4000] + "\n  ünïcödé ✓ " + EOS
    assert hf_tok(sample)["input_ids"] == ours.encode(sample, add_special_tokens=False).ids
    assert hf_tok.eos_token == hf_tok.pad_token == EOS
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f():"}]
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == apply_chat_template(messages)
    tok_cfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] and tok_cfg["eos_token"] == EOS and tok_cfg["pad_token"] == EOS
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == ours.token_to_id(EOS)


@pytest.mark.parametrize(("overrides", "field"), [
    ({"moe_every": 2}, "model.moe_every=2"),
    ({"shared_expert_ffn_dim": 32}, "model.shared_expert_ffn_dim=32"),
    ({"router": "aux_free"}, "model.router=aux_free"),
    ({"top_k": 1}, "model.top_k=1"),
    ({"memory": "titans", "attn_window": 16, "memory_chunk": 16}, "model.memory=titans"),
    ({"num_experts": 0, "moe_every": 2, "dense_ffn_dim": 256}, "model.moe_every=2 with num_experts=0"),
])
def test_a_setting_without_a_stock_equivalent_is_refused_by_name(tokenizer, tmp_path, overrides, field):
    ours = _export(tokenizer, tmp_path / "ours", **overrides)
    with pytest.raises(ConfigError, match=re.escape(field)):
        export_hf(ours, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # nothing half-written


def test_the_quickstart_config_exports():
    assert refusals(load_config("jobs/configs/moe_debug.yaml").model) == []


def test_cli_export_format_hf_from_an_export(tokenizer, tmp_path, capsys):
    ours = _export(tokenizer, tmp_path / "ours")
    main(["export", "--format", "hf", "--export", str(ours), "--out", str(tmp_path / "hf")])
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "mixtral"


def test_finetune_from_hf_equals_the_same_steps_from_our_export(ray_session, tmp_path):
    """Import -> fine-tune two steps (Ray Train, DeepSpeed ep_size 2) -> the same weights as two steps from
    the export the HF directory was written from."""
    from neuraflex_ray.config import model_for_data
    from neuraflex_ray.finetune.run import finetune
    from pipelines.text import build_text_dataset

    data = [f"data.output_dir={tmp_path / 'data'}", "data.max_bytes=200000", "data.vocab_size=512", "data.seq_len=32",
            "model.flavour=tiny", "model.max_seq_len=64"]
    manifest = build_text_dataset(load_config("jobs/configs/moe_debug.yaml", data).data)
    cfg = model_for_data(load_config("jobs/configs/moe_debug.yaml", data).model, manifest)
    torch.manual_seed(0)
    base = write_export(MoELM(cfg).state_dict(), cfg, "moe_lm", tmp_path / "base",
                        files={"tokenizer.json": tmp_path / "data" / "tokenizer.json"})
    hf_dir = export_hf(base, tmp_path / "hf")
    steps = [f"output_dir={tmp_path / 'runs'}", *data, "data.source=stdlib", "finetune.method=full",
             "train.micro_batch_size=4", "train.max_steps=2", "train.warmup_steps=1", "train.log_every=1",
             "train.eval_every=2", "train.eval_batches=1", "train.checkpoint_every=2", "train.lr=1e-2"]
    ours = finetune(load_config("jobs/configs/finetune_kjv.yaml", [*steps, "name=ours", f"finetune.from_export={base}"]),
                    fresh=True)
    theirs = finetune(load_config("jobs/configs/finetune_kjv.yaml", [*steps, "name=hf", f"finetune.from_hf={hf_dir}"]),
                      fresh=True)
    assert (tmp_path / "runs" / "hf" / "hf-import" / "model.safetensors").is_file()
    a, b = (load_file(str(Path(r["export"]) / "model.safetensors")) for r in (ours, theirs))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["norm.weight"], load_file(str(base / "model.safetensors"))["norm.weight"])  # it trained
