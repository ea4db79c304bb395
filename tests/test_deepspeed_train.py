"""Real Ray Train workers running the real DeepSpeed engine with ep_size=2 on gloo (tiny model).

One module-scoped dataset and one uninterrupted run serve several tests; each further run is a
different way of stopping and continuing that must land on the same steps and the same data.
"""

from __future__ import annotations

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

from neuraflex_ray.checkpoint import load_exported
from neuraflex_ray.config import JobConfig, ModelConfig, load_config
from neuraflex_ray.train.driver import latest_checkpoint, train
from neuraflex_ray.workflows import export_checkpoint, heldout_loss

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
    _, val_ds, _ = load_text_datasets(str(base_dir / "data"))
    blocks = read_blocks(val_ds)
    # The distributed eval saw the first eval_batches global batches of 2 x micro_batch_size rows.
    n = min(4 * 2 * 4, len(blocks) // 8 * 8)
    local = heldout_loss(model, blocks[:n])
    assert local == pytest.approx(baseline["val_loss"], rel=1e-4)


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
    """Inside a Ray Train worker: local dropless model vs the same weights under DeepSpeed EP."""
    import ray.train

    from neuraflex_ray.models.moe_lm import MoELM
    from neuraflex_ray.train.strategy import DeepSpeedStrategy

    cfg = JobConfig.from_dict(config["job"])
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(0)
    local = MoELM(cfg.model)
    torch.manual_seed(0)
    strategy = DeepSpeedStrategy(cfg)
    engine = strategy.setup(MoELM(cfg.model))
    gen = torch.Generator().manual_seed(100 + rank)  # different tokens per rank
    x = torch.randint(0, cfg.model.vocab_size, (4, 32), generator=gen)
    diffs = []
    for training in (False, True):  # eval (dropless all-reduce capacity) and train (capacity = E/k)
        local.train(training)
        strategy.train(training)
        with torch.no_grad():
            a, sa = engine(x)
            b, sb = local(x)
        diffs += [(a - b).abs().max(), (sa[0].aux_loss - sb[0].aux_loss).abs(), sa[0].dropped_fraction]
    worst = torch.stack(diffs).view(2, 3).amax(0)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return {"logits": float(worst[0]), "aux": float(worst[1]), "dropped": float(worst[2])}


def test_deepspeed_ep_path_equals_dropless_path(ray_session, base_dir):
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    # capacity_factor = num_experts / top_k = 4 / 2: room for every token at every expert, so
    # nothing is dropped in training mode either.
    cfg = job(base_dir, "compare", "model.vocab_size=512", "model.shared_expert_ffn_dim=32", "model.capacity_factor=2.0")
    result = TorchTrainer(_compare_paths, train_loop_config={"job": cfg.to_dict()},
                          scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1})).fit()
    out = result.return_value
    assert out["dropped"] == 0.0
    assert out["logits"] < 1e-5 and out["aux"] < 1e-6, out


def test_gradient_accumulation_updates_once_per_step(ray_session, base_dir):
    run = train(job(base_dir, "accum", "train.grad_accum_steps=2", "train.micro_batch_size=2", "train.max_steps=4",
                    "train.eval_every=4", "train.checkpoint_every=4"), fresh=True)
    assert run["steps"] == 4 and run["optimizer_steps"] == 4  # DeepSpeed's own count of updates
    assert run["data_position"]["batch_in_epoch"] == 8  # 2 micro-batches per step


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
