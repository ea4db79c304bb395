"""The BLT as a model family (model_type: blt): one job trains its entropy model as a stage, scores the
bytes with it on Ray Data, fits the entropy threshold, and trains the BLT on 2 Ray Train workers with
DeepSpeed expert parallelism in its global transformer; the export reproduces the distributed
validation loss in one process. Config mistakes name their field."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
import ray.cloudpickle
import torch
import torch.distributed as dist

from neuraflex_ray.checkpoint import export_checkpoint, load_exported
from neuraflex_ray.config import ConfigError, JobConfig, load_config
from neuraflex_ray.eval.blt import byte_losses
from neuraflex_ray.models.blt import starts_of
from neuraflex_ray.train.driver import train
from pipelines.shards import read_columns

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # worker functions travel by value

STEPS, BLOCK = 12, 48


def corpus(root: Path) -> Path:
    words = ["naïve", "café", "routes", "token", "to", "expert", "résumé", "and", "the", "patch", "byte", "of"]
    rng = np.random.default_rng(1)
    path = root / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, size=int(rng.integers(20, 60))))}) + "\n"
                            for _ in range(160)))
    return path


def job(tmp: Path, *extra: str) -> JobConfig:
    return load_config("jobs/configs/blt_debug.yaml", [
        f"output_dir={tmp / 'runs'}", "name=blt", "model.flavour=tiny",
        f"data.source={tmp / 'docs.jsonl'}", f"data.output_dir={tmp / 'bytes'}", f"data.block_bytes={BLOCK}",
        "data.max_bytes=0", "data.min_val_documents=20", "data.val_fraction=0.15", "data.entropy_steps=10",
        "train.micro_batch_size=4", f"train.max_steps={STEPS}", "train.warmup_steps=2", "train.log_every=2",
        "train.eval_every=6", "train.eval_batches=4", "train.checkpoint_every=6", *extra,
    ])


@pytest.fixture(scope="module")
def run(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("blt")
    corpus(tmp)
    cfg = job(tmp)
    return {"cfg": cfg, "tmp": tmp, "result": train(cfg, fresh=True)}


def test_the_entropy_model_trains_as_a_stage_and_the_manifest_records_it(run):
    manifest = run["result"]["manifest"]
    export = Path(manifest["entropy_model"])
    meta = json.loads((export / "config.json").read_text())
    assert export.is_relative_to(run["tmp"] / "bytes" / "entropy") and meta["model_type"] == "moe_lm"
    assert meta["model"]["max_seq_len"] >= BLOCK + 1 and meta["entropy_settings"]["steps"] == 10
    assert manifest["entropy_checkpoint"] == meta["source_checkpoint"] and Path(manifest["entropy_checkpoint"]).is_dir()
    assert manifest["val_documents"] >= 20


def test_the_fitted_threshold_hits_the_target_mean_patch_size_on_the_training_split(run):
    model = run["result"]["model_config"]
    assert model["threshold"] > 0
    assert model["mean_patch_bytes"] == pytest.approx(4.0, rel=0.05)
    assert run["result"]["mean_patch_bytes"] == model["mean_patch_bytes"]  # and the run's summary says it


def test_two_workers_train_it_with_expert_parallelism_in_the_global_transformer(run):
    r = run["result"]
    assert (r["workers"], r["ep_size"], r["steps"]) == (2, 2, STEPS)
    losses = [h["ce"] for h in r["history"]]
    assert losses[-1] < losses[0] - 0.3, losses
    assert r["flops_per_byte"] > 0 and r["params"] > r["hash_embedding_params"] > 0
    ds = Path(r["checkpoint"]) / "ds"
    experts = sorted(f.name for f in ds.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))
    assert len(experts) == 2 * 4  # every expert of both global MoE layers


def test_export_reproduces_the_distributed_validation_loss_and_carries_its_entropy_model(run):
    r, tmp = run["result"], run["tmp"]
    out = export_checkpoint(r["checkpoint"], tmp / "bytes", tmp / "export")
    assert not dist.is_initialized()
    model, meta = load_exported(out)
    assert meta["model_type"] == "blt" and (out / meta["entropy_model"] / "model.safetensors").is_file()
    assert meta["model"]["threshold"] == r["model_config"]["threshold"]
    manifest = r["manifest"]
    n = 4 * 2 * 4  # eval_batches global batches of 2 workers x micro_batch_size blocks
    val = read_columns(tmp / "bytes", manifest["val_shards"], ("bytes", "entropy"), limit=n)
    nats = byte_losses(model, val["bytes"], starts_of(model.cfg, val["bytes"], val["entropy"]))
    assert float(nats.mean()) == pytest.approx(r["val_loss"], rel=1e-4)


def _compare_global_paths(config: dict) -> dict:
    """In a Ray Train worker: the BLT on the local dropless path vs the same weights with its global
    transformer under DeepSpeed expert parallelism, in eval and in training mode, with padded patch
    slots (routed nowhere on either path)."""
    import ray.train

    from neuraflex_ray.models.blt import BLT
    from neuraflex_ray.models.blt_patching import patch_starts
    from neuraflex_ray.train.strategy import DeepSpeedStrategy

    cfg = JobConfig.from_dict(config)
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(0)
    local = BLT(cfg.model)
    torch.manual_seed(0)
    strategy = DeepSpeedStrategy(cfg)
    engine = strategy.setup(BLT(cfg.model))
    x = torch.randint(0, 256, (3, BLOCK + 1), generator=torch.Generator().manual_seed(10 + rank))
    x[:, ::4] = 32  # spaces: patches of 1-4 bytes, so every block has empty (padded) slots
    starts = patch_starts(x, None, "space", min_bytes=cfg.model.min_patch_bytes)
    assert int(starts[:, :-1].sum(1).max()) < BLOCK // cfg.model.min_patch_bytes  # some slots stay empty
    worst = []
    for training in (False, True):
        local.train(training)
        strategy.train(training)
        with torch.no_grad():
            a, sa = engine(x[:, :-1], starts)
            b, sb = local(x[:, :-1], starts)
        worst += [(a - b).abs().max(), (sa[0].aux_loss - sb[0].aux_loss).abs(), sa[0].dropped_fraction]
    out = torch.stack(worst).view(2, 3).amax(0)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return {"logits": float(out[0]), "aux": float(out[1]), "dropped": float(out[2])}


def test_the_deepspeed_expert_parallel_path_equals_the_local_path(ray_session, tmp_path):
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    # capacity_factor = num_experts / top_k: room for every patch at every expert, nothing dropped.
    cfg = job(tmp_path, "model.patching=space", "data.entropy_model=", "model.global_model.capacity_factor=2.0")
    result = TorchTrainer(_compare_global_paths, train_loop_config=cfg.to_dict(),
                          scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1})).fit()
    out = result.return_value
    assert out["dropped"] == 0.0 and out["logits"] < 1e-5 and out["aux"] < 1e-6, out


@pytest.mark.parametrize("override, field", [
    ("model.patching=words", "model.patching"),
    ("data.entropy_model=", "data.entropy_model"),
    ("model.min_patch_bytes=5", "model.min_patch_bytes"),
    ("model.patch_size=0.5", "model.patch_size"),
    ("model.threshold=-1", "model.threshold"),
    ("data.block_bytes=4096", "data.block_bytes"),
    ("model.global_model.num_experts=3", "model.global_model.num_experts"),
    ("data.entropy_model=/nowhere", "data.entropy_model"),
    ("data.entropy_flavour=huge", "data.entropy_flavour"),
])
def test_bad_settings_are_config_errors_naming_the_field(tmp_path, override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        job(tmp_path, override)


def test_static_and_space_patching_refuse_entropy_settings(tmp_path):
    for mode in ("static", "space"):
        with pytest.raises(ConfigError, match=r"model\.threshold/model\.monotonic apply to model\.patching=entropy"):
            job(tmp_path, f"model.patching={mode}", "model.threshold=2.0")
