"""NeuroFM evaluation on synthetic windows whose right answers are known.

Signals are sums of three sines with random phases per window, mixed into the channels: a ridge
autoregression extrapolates them and a ridge over the other channels reconstructs a channel, while
persistence cannot. The models are test doubles following the contract's call signature: an oracle
that looks the true window up from the visible context, and a constant-zero model.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from neuraflex_ray.eval.neuro import evaluate_neurofm, format_table
from neuraflex_ray.eval.ridge import RidgeStats, fit_ridge

N, H, P = 8, 2, 8  # context patches, future patches, samples per patch
HORIZONS = [1, 2]
CTX, T = N * P, (N + H) * P
FREQS = (0.03, 0.07, 0.11)  # cycles per sample


@dataclass
class Arrays:
    """Duck-typed stand-in for pipelines.timeseries.SeriesArrays (keeps this test independent of the pipeline)."""

    x: np.ndarray  # float32 [W, C, T]
    chan: np.ndarray  # int64 [W, C], 0 = padding
    present: np.ndarray  # bool [W]


def make_manifest(channels: dict[str, int]) -> dict:
    ids, next_id = {}, 1
    for m, c in channels.items():
        for i in range(c):
            ids[f"{m}:ch{i:02d}"] = next_id
            next_id += 1
    return {"modalities": {m: {"rate": 32.0, "max_channels": c, "patch_len": P, "context_samples": CTX,
                               "future_samples": H * P} for m, c in channels.items()},
            "context_s": N * 0.25, "patch_s": 0.25, "horizons_s": [k * 0.25 for k in HORIZONS],
            "context_patches": N, "horizon_patches": HORIZONS, "channel_ids": ids, "n_channel_ids": next_id}


def make_split(manifest: dict, n_windows: int, seed: int, *, valid: dict[str, int] | None = None,
               every: dict[str, int] | None = None, noise: float = 0.01) -> dict[str, Arrays]:
    """Per modality: channels = fixed mixing (seed 0) of 3 sines with per-window phases (split seed)."""
    rng = np.random.default_rng(seed)
    t = np.arange(T)
    out, first_id = {}, 1
    for m, spec in manifest["modalities"].items():
        c_max = spec["max_channels"]
        c = (valid or {}).get(m, c_max)
        mix = np.random.default_rng(sum(map(ord, m))).normal(size=(c, len(FREQS)))
        phase = rng.uniform(0, 2 * np.pi, (n_windows, len(FREQS), 1))
        src = np.sin(2 * np.pi * np.array(FREQS)[:, None] * t + phase)  # [W, 3, T]
        x = np.zeros((n_windows, c_max, T), np.float32)
        x[:, :c] = np.einsum("cs,wst->wct", mix, src) + noise * rng.normal(size=(n_windows, c, T))
        chan = np.zeros((n_windows, c_max), np.int64)
        chan[:, :c] = np.arange(first_id, first_id + c)
        present = np.arange(n_windows) % (every or {}).get(m, 1) == 0
        x[~present], chan[~present] = 0.0, 0
        out[m] = Arrays(x, chan, present)
        first_id += c_max
    return out


class Oracle(torch.nn.Module):
    """Knows the val windows: finds the window from any visible channel's context and returns its truth."""

    def __init__(self, val: dict[str, Arrays], dim: int = 16):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.val = val
        self.table = {}
        for m, a in val.items():
            for w in range(len(a.present)):
                for c in np.nonzero(a.chan[w] > 0)[0]:
                    self.table[m, int(c), a.x[w, c, :CTX].tobytes()] = w
        self.emb = torch.randn(len(next(iter(val.values())).present), dim, generator=torch.Generator().manual_seed(0))
        self.calls_in_train_mode = 0

    def _windows(self, inputs, patch_mask) -> list[int]:
        rows = []
        for b in range(len(next(iter(inputs.values())).x)):
            w = None
            for m, inp in inputs.items():
                hidden = patch_mask[m][b].all(-1) if patch_mask and m in patch_mask else torch.zeros(inp.x.shape[1], dtype=bool)
                assert (inp.x[b][hidden] == 0).all(), "a hidden channel's samples reached the model"
                for c in range(inp.x.shape[1]):
                    if inp.chan[b, c] > 0 and not hidden[c] and w is None:
                        w = self.table.get((m, c, inp.x[b, c].numpy().tobytes()))
            assert w is not None, "window not found: the model was not given its context"
            rows.append(w)
        return rows

    def forward(self, inputs, patch_mask=None):
        self.calls_in_train_mode += self.training
        assert not torch.is_grad_enabled()
        rows = self._windows(inputs, patch_mask)
        recon, forecast = {}, {}
        for m, inp in inputs.items():
            assert inp.x.shape[-1] == CTX, "the model must get context samples only"
            full = torch.as_tensor(self.val[m].x[rows])
            recon[m] = full[:, :, :CTX].reshape(len(rows), -1, N, P)
            forecast[m] = torch.stack([full[:, :, CTX + (k - 1) * P:CTX + k * P] for k in HORIZONS], dim=2)
        emb = self.emb[rows]
        return SimpleNamespace(latents=emb[:, None], embedding=emb, recon=recon, forecast=forecast)

    def embed(self, inputs):
        return self.forward(inputs).embedding


class Zero(torch.nn.Module):
    """Predicts 0 everywhere and embeds every window to the same vector."""

    def forward(self, inputs, patch_mask=None):
        b = len(next(iter(inputs.values())).x)
        recon = {m: torch.zeros(b, i.x.shape[1], N, P) for m, i in inputs.items()}
        forecast = {m: torch.zeros(b, i.x.shape[1], len(HORIZONS), P) for m, i in inputs.items()}
        return SimpleNamespace(latents=torch.ones(b, 1, 4), embedding=torch.ones(b, 4), recon=recon, forecast=forecast)

    def embed(self, inputs):
        return self.forward(inputs).embedding


@pytest.fixture(scope="module")
def data():
    manifest = make_manifest({"eeg": 16, "ecg": 4})
    kw = dict(valid={"ecg": 2}, every={"ecg": 2})  # ecg: 2 real channels + 2 padding slots, in every other window
    return manifest, make_split(manifest, 48, seed=1, **kw), make_split(manifest, 20, seed=2, **kw)


def test_ridge_closed_form_matches_lstsq():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 5)), rng.normal(size=(200, 3))
    y += x @ rng.normal(size=(5, 3)) + 4.0
    stats = RidgeStats(5, 3).add(x[:120], y[:120]).merged(RidgeStats(5, 3).add(x[120:], y[120:]))
    w, b = stats.solve(1e-10)
    coef = np.linalg.lstsq(np.c_[x, np.ones(200)], y, rcond=None)[0]
    np.testing.assert_allclose(w, coef[:5], atol=1e-6)
    np.testing.assert_allclose(b, coef[5], atol=1e-6)
    w, b = stats.solve(0.3)  # the sums give the same squared error as the rows
    np.testing.assert_allclose(stats.sse(w, b), ((x @ w + b - y) ** 2).sum(0), rtol=1e-8)
    assert fit_ridge(RidgeStats(5, 3).add(x[:150], y[:150]), RidgeStats(5, 3).add(x[150:], y[150:])).alpha < 0.1


def test_oracle_is_perfect_and_ridge_beats_persistence(data):
    manifest, train, val = data
    model = Oracle(val).train()
    res = evaluate_neurofm(model, train, val, manifest, batch_size=7, adapt_steps=0)
    assert model.training and model.calls_in_train_mode == 0  # scored in eval mode, mode restored after
    assert [r["horizon_s"] for r in res["forecast"]] == [0.25, 0.5]
    for row in res["forecast"]:
        assert row["mse"] == pytest.approx(0, abs=1e-12)
        assert row["skill_vs_persistence"] == pytest.approx(1) and row["skill_vs_ridge"] == pytest.approx(1)
        assert row["mse_ridge"] < 0.05 * row["mse_persistence"]  # the AR ridge extrapolates the sines
        assert set(row["per_modality"]) == {"eeg", "ecg"}
        # pooling weighs every value equally: values = 20 windows * 16 eeg + 10 windows * 2 ecg channels, P each
        assert row["n_values"] == (20 * 16 + 10 * 2) * P
        k = row["horizon_patches"]
        x = val["eeg"].x.astype(np.float64)
        pers = ((x[:, :, CTX - 1:CTX] - x[:, :, CTX + (k - 1) * P:CTX + k * P]) ** 2).mean()
        assert row["per_modality"]["eeg"]["mse_persistence"] == pytest.approx(pers)
    r2 = res["masked_channel_r2"]
    assert r2["zero_shot"] == pytest.approx(1) and r2["ridge"] > 0.99 and r2["adapted"] is None
    assert [c["id"] for c in r2["channels"]] == [1, 9]  # every 8th eeg channel id
    rt = res["retrieval_top1"]
    p_min = 1 / 1001  # no random re-pairing of the 10 windows retrieves as well (permutation test)
    assert rt["model"] == 1.0 and rt["pairs"] == [{"a": "eeg", "b": "ecg", "n": 10, "model": 1.0, "chance": 0.1,
                                                   "p_value": pytest.approx(p_min)}]
    top5 = res["retrieval_top5"]["pairs"]  # top-5 of 10 is sometimes perfect by chance too
    assert top5 == [{"a": "eeg", "b": "ecg", "n": 10, "model": 1.0, "chance": 0.5, "p_value": top5[0]["p_value"]}]
    assert top5[0]["p_value"] < 0.01
    assert rt["chance"] == pytest.approx(0.1) and rt["p_value"] == pytest.approx(p_min)
    emb = res["embedding"]  # random 16-dim vectors per window: spread out, many directions
    assert emb["width"] == 16 and emb["fused"]["spread"] > 0.8 and emb["fused"]["effective_rank"] > 8
    assert "Masked-channel" in format_table(res)


def test_zero_model_loses_to_ridge_and_retrieves_at_chance(data):
    manifest, train, val = data
    res = evaluate_neurofm(Zero(), train, val, manifest, max_windows=12, adapt_steps=0)
    assert res["n_val_windows"] == 12
    for row in res["forecast"]:
        assert row["skill_vs_ridge"] < 0
    assert res["masked_channel_r2"]["zero_shot"] < 0.01
    rt = res["retrieval_top1"]  # a constant embedding ties everywhere: expected top-k is exactly chance
    assert rt["model"] == pytest.approx(rt["chance"]) and rt["chance"] == pytest.approx(1 / rt["pairs"][0]["n"])
    assert rt["p_value"] == 1.0  # every re-pairing scores as well
    emb = res["embedding"]  # one vector for every window: collapsed, by both measures
    assert emb["width"] == 4 and emb["fused"]["windows"] == 12
    assert emb["fused"]["spread"] == pytest.approx(0.0, abs=1e-9)
    assert emb["fused"]["effective_rank"] == pytest.approx(1.0, rel=1e-3)
    assert set(emb["spread"]) == {"eeg", "ecg"} and max(emb["spread"].values()) == pytest.approx(0.0, abs=1e-9)
    top5 = res["retrieval_top5"]
    assert top5["model"] == pytest.approx(top5["chance"]) and top5["chance"] == pytest.approx(5 / top5["pairs"][0]["n"])


def test_baselines_are_fitted_on_train_only():
    manifest = make_manifest({"eeg": 16})
    val = make_split(manifest, 16, seed=2)
    same = make_split(manifest, 48, seed=1)  # train drawn from val's process
    flipped_future = make_split(manifest, 48, seed=1)
    flipped_future["eeg"].x[:, :, CTX:] *= -1  # train says: the future is the negated continuation
    flipped_chan = make_split(manifest, 48, seed=1)
    flipped_chan["eeg"].x[:, 0] *= -1  # train says: channel id 1 is the negated mixture

    control = evaluate_neurofm(Zero(), same, val, manifest, adapt_steps=0)
    future = evaluate_neurofm(Zero(), flipped_future, val, manifest, adapt_steps=0)
    chan = evaluate_neurofm(Zero(), flipped_chan, val, manifest, adapt_steps=0)
    for good, bad in zip(control["forecast"], future["forecast"], strict=True):
        assert good["mse_ridge"] < 0.01 * good["mse_persistence"]
        k = bad["horizon_patches"]
        y = val["eeg"].x[:, :, CTX + (k - 1) * P:CTX + k * P].astype(np.float64)
        assert bad["mse_ridge"] == pytest.approx(((2 * y) ** 2).mean(), rel=0.05)  # follows the train fit: predicts -y
        assert bad["mse_persistence"] == good["mse_persistence"]  # persistence fits nothing
    assert control["masked_channel_r2"]["channels"][0]["ridge"] > 0.99
    assert chan["masked_channel_r2"]["channels"][0]["ridge"] < -2  # predicts -channel: R^2 = 1 - 4 = -3


def test_missing_pieces_give_reasons():
    manifest = make_manifest({"ecg": 2})
    train, val = make_split(manifest, 24, seed=1), make_split(manifest, 8, seed=2)
    res = evaluate_neurofm(Zero(), train, val, manifest, adapt_steps=0)
    assert res["masked_channel_r2"]["zero_shot"] is None and "eeg" in res["masked_channel_r2"]["reason"]
    assert res["retrieval_top1"]["model"] is None and res["retrieval_top1"]["reason"]
    assert res["forecast"][0]["mse"] is not None
    table = format_table(res)
    assert "n/a" in table and "retrieval" in table


def tiny_neurofm(manifest: dict) -> torch.nn.Module:
    from neuraflex_ray.config import load_config, neurofm_for_data
    from neuraflex_ray.models.neurofm import NeuroFM

    cfg = load_config(None, ["model_type=neurofm", "train.strategy=fsdp", "model.flavour=tiny"]).model
    torch.manual_seed(0)
    return NeuroFM(neurofm_for_data(cfg, manifest))


def test_adaptation_learns_from_train_windows_only():
    """`adapted` trains a copy on the train windows the ridge saw: its loss falls, the pre-trained
    model is untouched, and replacing every held-out window changes nothing about the adaptation."""
    manifest = make_manifest({"eeg": 16})
    train, val = make_split(manifest, 24, seed=1), make_split(manifest, 8, seed=2)
    model = tiny_neurofm(manifest)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = evaluate_neurofm(model, train, val, manifest, adapt_steps=40)
    r2 = res["masked_channel_r2"]
    assert r2["adapted"] is not None and r2["adaptation"]["train_windows"] == 24
    assert r2["adaptation"]["last_loss"] < 0.9 * r2["adaptation"]["first_loss"]
    assert r2["adapted"] > r2["zero_shot"]  # an untrained model gains from 40 steps on the same process
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    other_val = make_split(manifest, 8, seed=3)
    other_val["eeg"].x[:] *= -5.0
    again = evaluate_neurofm(model, train, other_val, manifest, adapt_steps=40)["masked_channel_r2"]["adaptation"]
    assert again == r2["adaptation"]  # same losses to the last digit: held-out data never entered


def test_retrieval_within_each_session(data):
    """Per held-out session: a window among its own session's windows only."""
    from neuraflex_ray.eval.neuro import retrieval_by_session

    manifest, _, val = data
    n = len(next(iter(val.values())).present)
    recordings = np.array(["a"] * (n // 2) + ["b"] * (n - n // 2))
    with torch.no_grad():
        out = retrieval_by_session(Oracle(val).eval(), val, manifest, recordings, batch_size=7)
    both = out  # the sessions where eeg and ecg co-occur in >= 2 windows
    assert both and all(r["top1"]["model"] == 1.0 for r in both.values())
    for name, r in both.items():
        held = int(((recordings == name) & val["eeg"].present & val["ecg"].present).sum())
        assert r["top1"]["pairs"][0]["n"] == held and r["top1"]["chance"] == pytest.approx(1 / held)
