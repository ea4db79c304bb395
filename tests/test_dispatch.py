"""serving/dispatch.py: the first pass's classifier separates domains it was fitted on and names the base
as no adapter (the HTTP path through the official client is in test_finetune.py)."""

import numpy as np
import torch

from neuraflex_ray.config import load_config
from neuraflex_ray.models.moe_lm import MoELM
from neuraflex_ray.serving.dispatch import BASE, fit_dispatcher


def test_the_classifier_routes_held_out_prompts_of_each_domain_to_it():
    torch.manual_seed(0)
    model = MoELM(load_config(None, ["model.flavour=tiny", "model.vocab_size=192", "data.seq_len=32"]).model).eval()
    rng = np.random.default_rng(0)
    ranges = {BASE: (0, 60), "prose": (60, 120), "legal": (120, 180)}  # three vocabularies, one per domain

    def blocks(name: str, n: int) -> np.ndarray:
        lo, hi = ranges[name]
        return rng.integers(lo, hi, size=(n, 33))

    dispatcher = fit_dispatcher(model, {name: blocks(name, 32) for name in ranges}, samples=24)
    assert dispatcher.classes == sorted(ranges)
    for name in ranges:
        for prompt in blocks(name, 5):
            choice, info = dispatcher.choose(model, prompt[:rng.integers(8, 33)].tolist())
            assert info["adapter"] == name and choice == (None if name == BASE else name)
            assert abs(sum(info["probabilities"].values()) - 1) < 1e-3 and info["first_pass_ms"] > 0
