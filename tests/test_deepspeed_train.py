"""Real Ray Train workers running the real DeepSpeed engine with ep_size=2 on gloo (tiny model).

One module-scoped dataset and one uninterrupted run serve several tests; each further run is a
different way of stopping and continuing that must land on the same steps and the same data.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import ray
import ray.cloudpickle
import torch
import torch.distributed as dist

from neuraflex_ray.checkpoint import export_checkpoint, load_exported
from neuraflex_ray.config import JobConfig, ModelConfig, load_config
from neuraflex_ray.eval.lm import heldout_loss
from neuraflex_ray.train.driver import latest_checkpoint, train

# Worker functions defined here must travel by value: the workers cannot import this module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

STEPS = 12


def job(tmp: Path, name: str, *extra: str) -> JobConfig:
    return load_config("jobs/configs/moe_debug.yaml", [
        f"name={name}", f"output_dir={tmp / 'runs'}",
        "model.flavour=tiny", "model.max_seq_len=64",
        f"data.output_dir={tmp / 'data'}", "data.max_bytes=400000", "data.vocab_size=512", "data.seq_len=32",
        "train.micro_batch_size=4", f"train.max_steps={STEPS}", "train.warmup_steps=2", "train.log_every=2",
        "train.eval_every=6", "train.eval_batches=4", "train.checkpoint_every=4", "train.lr=3e-3",
        *extra,
    ])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ds")


@pytest.fixture(scope="module")
def baseline(ray_session, base_dir):
    """One uninterrupted 2-worker, ep_size=2, ZeRO-2 run."""
    return train(job(base_dir, "baseline"), fresh=True)


def test_two_worker_ep2_run_lowers_loss(baseline, base_dir):
    assert (baseline["workers"], baseline["ep_size"], baseline["zero_stage"]) == (2, 2, 2)
    assert baseline["steps"] == STEPS
    losses = [h["ce"] for h in baseline["history"]]
    assert losses[-1] < losses[0] - 0.5, losses
    assert math.isfinite(baseline["val_loss"]) and baseline["mfu"] > 0
    # How long steps waited for data: per progress interval and over the run, a share of step time.
    waits = [h["data_wait"] for h in baseline["history"]]
    assert waits and all(0.0 <= w <= 1.0 for w in waits) and 0.0 <= baseline["data_wait_frac"] <= 1.0
    # Where the rest went: forward+backward and the optimizer step, shares that leave room for the wait.
    for h in baseline["history"]:
        assert 0.0 < h["fwd_bwd"] <= 1.0 and 0.0 < h["optimizer"] < 1.0 and h["fwd_bwd"] + h["optimizer"] <= 1.0 + 1e-6
    assert 0.3 < baseline["fwd_bwd_frac"] + baseline["optimizer_frac"] + baseline["data_wait_frac"] <= 1.0 + 1e-6
    run_dir = Path(baseline["run_dir"])
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and (ckpt / "ds" / "layer_0_expert_3_mp_rank_00_model_states.pt").is_file()


def test_export_reproduces_validation_loss_in_one_process(baseline, base_dir):
    from pipelines.text import load_text_datasets, read_blocks

    model_cfg = ModelConfig(**baseline["model_config"])
    out = export_checkpoint(baseline["checkpoint"], base_dir / "data", base_dir / "export")
    assert not dist.is_initialized()  # one process, no process group
    model, meta = load_exported(out)
    assert meta["model"]["num_experts"] == model_cfg.num_experts
    # The export fitted its confidence temperature on held-out text (eval/calibration.py).
    assert meta["calibration"]["temperature"] > 0 and 0 <= meta["calibration"]["ece_after"] <= 1
    _, val_ds, _ = load_text_datasets(str(base_dir / "data"))
    blocks = read_blocks(val_ds)
    # The distributed eval saw the first eval_batches global batches of 2 x micro_batch_size rows.
    n = min(4 * 2 * 4, len(blocks) // 8 * 8)
    local = heldout_loss(model, blocks[:n])
    assert local == pytest.approx(baseline["val_loss"], rel=1e-4)


def test_inspect_writes_specialisation_table_and_heatmap(baseline, base_dir, tmp_path):
    from neuraflex_ray.cli import main
    from neuraflex_ray.eval.token_kinds import CODE_KINDS

    out = export_checkpoint(baseline["checkpoint"], base_dir / "data", base_dir / "export-inspect")
    assert main(["inspect", "--export", str(out), "--out", str(tmp_path), "--max-blocks", "8"]) == 0
    table = json.loads((tmp_path / "routing.json").read_text())
    assert table["kinds"] == "code" and table["tokens"] == 8 * 32
    assert [layer["layer"] for layer in table["layers"]] == [0, 1]  # the tiny flavour's two MoE layers
    for layer in table["layers"]:
        assert set(layer["kinds"]) <= set(CODE_KINDS) and {"identifier", "operator"} <= set(layer["kinds"])
        assert sum(v["tokens"] for v in layer["kinds"].values()) == table["tokens"]
        for v in layer["kinds"].values():
            assert sum(v["expert_share"]) == pytest.approx(1.0, abs=1e-3)
        assert 0 < layer["routing_entropy_bits"] <= layer["max_entropy_bits"] == pytest.approx(2.0)
    assert 0 <= table["layers"][0]["next_layer_top1"]["nmi"] <= 1
    assert "| identifier |" in (tmp_path / "routing.md").read_text()
    assert (tmp_path / "routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dense_baseline_trains_with_zero2_accumulates_and_exports(ray_session, baseline, base_dir):
    from neuraflex_ray.models.moe_lm import param_counts

    # Two micro-batches of 2 per optimizer step (the run doubles as the gradient-accumulation check).
    run = train(job(base_dir, "dense", "model.num_experts=0", "train.ep_size=1", "train.max_steps=4",
                    "train.eval_every=4", "train.checkpoint_every=4", "train.grad_accum_steps=2",
                    "train.micro_batch_size=2"), fresh=True)
    assert (run["workers"], run["ep_size"], run["zero_stage"]) == (2, 1, 2)
    assert run["steps"] == 4 and run["optimizer_steps"] == 4  # DeepSpeed's own count of updates
    assert run["data_position"]["batch_in_epoch"] == 8  # 2 micro-batches per step
    assert run["history"][-1]["ce"] < run["history"][0]["ce"]
    out = export_checkpoint(run["checkpoint"], base_dir / "data", base_dir / "export-dense")
    model, meta = load_exported(out)
    cfg = ModelConfig(**meta["model"])
    moe_cfg = ModelConfig(**baseline["model_config"])
    assert param_counts(cfg)["active"] == param_counts(moe_cfg)["active"] - param_counts(moe_cfg)["router"]
    from pipelines.text import load_text_datasets, read_blocks

    _, val_ds, _ = load_text_datasets(str(base_dir / "data"))
    # The distributed eval saw eval_batches (4) global batches of 2 workers x micro_batch_size (2) rows.
    assert heldout_loss(model, read_blocks(val_ds)[:16]) == pytest.approx(run["val_loss"], rel=1e-4)


def test_worker_failure_resumes_from_last_checkpoint_same_data(ray_session, baseline, base_dir):
    # The last worker raises at step 6; FailureConfig restarts the group from the step-4 checkpoint.
    run = train(job(base_dir, "failure", "train.inject_failure_at_step=6", "train.max_failures=1"), fresh=True)
    assert run["restored_from_step"] == 4
    assert run["steps"] == STEPS
    assert run["data_position"] == baseline["data_position"]
    # The restarted attempt saw exactly the batches the uninterrupted run saw at steps 5..12.
    assert run["batch_fingerprints"] == baseline["batch_fingerprints"][4:]
    assert run["final_loss"] == pytest.approx(baseline["final_loss"], abs=1e-3)


def test_explicit_resume_from_run_dir(ray_session, baseline, base_dir):
    more = STEPS + 4
    run = train(job(base_dir, "resumed", f"train.resume_from={baseline['run_dir']}", f"train.max_steps={more}"),
                fresh=True)
    assert run["restored_from_step"] == STEPS
    assert run["steps"] == more
    assert len(run["batch_fingerprints"]) == 4


def _compare_paths(config: dict) -> dict:
    """Inside a Ray Train worker, for every router and for a Titans memory with windowed attention: the
    local dropless model vs the same weights under DeepSpeed EP, then one real training step of the
    aux-free router's bias."""
    import ray.train

    from neuraflex_ray.checkpoint import consolidate_deepspeed
    from neuraflex_ray.families.moe_lm.task import LMTask
    from neuraflex_ray.models.moe_lm import MoELM
    from neuraflex_ray.models.routers import ROUTERS, balance_biases
    from neuraflex_ray.train.strategy import DeepSpeedStrategy

    rank = ray.train.get_context().get_world_rank()
    gen = torch.Generator().manual_seed(100 + rank)  # different tokens per rank
    out = {}
    cases = {**{router: {"router": router} for router in ROUTERS},
             "titans": {"memory": "titans", "attn_window": 8, "memory_chunk": 8}}  # 4 memory updates in 32 tokens
    for router, overrides in cases.items():
        cfg = JobConfig.from_dict({**config["job"], "model": {**config["job"]["model"], **overrides}})
        torch.manual_seed(0)
        local = MoELM(cfg.model)
        torch.manual_seed(0)
        strategy = DeepSpeedStrategy(cfg)
        engine = strategy.setup(MoELM(cfg.model))
        if router == "aux_free":  # a bias that changes the choices, the same on every rank
            for b_local, b_ds in zip(balance_biases(local), balance_biases(engine), strict=True):
                b_local.copy_(torch.tensor([0.2, -0.1, 0.0, 0.05]))
                b_ds.copy_(b_local)
        x = torch.randint(0, cfg.model.vocab_size, (4, 33), generator=gen)
        diffs = []
        for training in (False, True):  # eval (dropless all-reduce capacity) and train (capacity = E/k)
            local.train(training)
            strategy.train(training)
            with torch.no_grad():
                a, sa = engine(x[:, :-1])
                b, sb = local(x[:, :-1])
            diffs += [(a - b).abs().max(), (sa[0].aux_loss - sb[0].aux_loss).abs(), sa[0].dropped_fraction]
        worst = torch.stack(diffs).view(2, 3).amax(0)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        out[router] = {"logits": float(worst[0]), "aux": float(worst[1]), "dropped": float(worst[2])}
        if router == "aux_free":
            # One real step: the bias moves by the load summed over both ranks, identically on each.
            task = LMTask(cfg, {"train_bytes_per_token": 1.0, "val_bytes_per_token": 1.0}, rank)
            before = torch.cat(balance_biases(engine)).clone()
            step = task.step(engine, x, 0, strategy.device)
            strategy.backward(step.loss)
            strategy.step(1e-3)
            task.after_update(engine)
            bias = torch.cat(balance_biases(engine))
            every = [torch.empty_like(bias) for _ in range(dist.get_world_size())]
            dist.all_gather(every, bias)
            out["bias_moved"] = float((bias - before).abs().max())
            out["bias_rank_diff"] = float(max((b - every[0]).abs().max() for b in every))
            # It travels in the checkpoint: the consolidated (export) state holds the same bias.
            ckpt = Path(config["tmp"]) / "aux_free_ckpt"
            strategy.save(ckpt, {"step": 1, "epoch": 0, "samples_in_epoch": 0, "model_type": "moe_lm",
                                 "strategy": "deepspeed", "world_size": 2, "model_config": dataclasses.asdict(cfg.model)})
            dist.barrier()
            state, _ = consolidate_deepspeed(ckpt)
            saved = torch.cat([state[f"layers.{i}.ffn.balance_bias"] for i in range(cfg.model.n_layers)])
            out["bias_checkpoint_diff"] = float((saved - bias).abs().max())
    return out


def test_deepspeed_ep_path_equals_dropless_path_for_every_router_and_the_memory(ray_session, base_dir):
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    # capacity_factor = num_experts / top_k = 4 / 2: room for every token at every expert, so
    # nothing is dropped in training mode either.
    cfg = job(base_dir, "compare", "model.vocab_size=512", "model.shared_expert_ffn_dim=32", "model.capacity_factor=2.0",
              "model.balance_bias_rate=0.01")
    result = TorchTrainer(_compare_paths, train_loop_config={"job": cfg.to_dict(), "tmp": str(base_dir)},
                          scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1})).fit()
    out = result.return_value
    for router in ("softmax_topk", "aux_free", "sinkhorn", "titans"):
        assert out[router]["dropped"] == 0.0, out
        assert out[router]["logits"] < 1e-5 and out[router]["aux"] < 1e-6, out
    assert out["bias_moved"] == pytest.approx(0.01)  # every bias entry moves by exactly the rate
    assert out["bias_rank_diff"] == 0.0 and out["bias_checkpoint_diff"] == 0.0


def test_resume_from_missing_or_finished_checkpoint_fails_early(ray_session, baseline, base_dir, tmp_path):
    from neuraflex_ray.config import ConfigError

    with pytest.raises(ConfigError, match="train.resume_from"):
        train(job(base_dir, "nothing", f"train.resume_from={tmp_path}"))
    with pytest.raises(ConfigError, match="raise train.max_steps"):
        train(job(base_dir, "finished", f"train.resume_from={baseline['run_dir']}"))


def test_latest_checkpoint_skips_incomplete(baseline, tmp_path):
    src = latest_checkpoint(baseline["run_dir"])
    root = tmp_path / "run" / "checkpoints" / "train"
    good, torn = root / "checkpoint_2000-01-01_00-00-00.000000", root / "checkpoint_2000-01-01_00-00-01.000000"
    shutil.copytree(src, good)
    shutil.copytree(src, torn)
    next((torn / "ds").glob("layer_1_expert_2_*")).unlink()  # as if one rank's upload broke off
    assert latest_checkpoint(tmp_path / "run") == good
    (good / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert latest_checkpoint(tmp_path / "run") is None


def test_pipeline_blocks_feed_equal_shapes(baseline, base_dir):
    from pipelines.text import load_text_datasets, read_blocks

    train_ds, _, manifest = load_text_datasets(str(base_dir / "data"))
    blocks = read_blocks(train_ds)
    assert blocks.shape[1] == manifest["seq_len"] + 1 == 33
    assert blocks.dtype == np.int32 and blocks.max() < manifest["vocab_size"]
