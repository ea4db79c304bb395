"""Training-time augmentations (pipelines/augment.py), their config and NeuroTask's hook.

CPU only, tiny tensors and a tiny NeuroFM, no Ray and no process group.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from neuraflex_ray.config import AugmentConfig, ConfigError, JobConfig, load_config
from neuraflex_ray.families.neurofm.augment import _resample, augment_window
from neuraflex_ray.families.neurofm.task import NeuroTask
from neuraflex_ray.models.neurofm import SeriesInput
from neuraflex_ray.models.neurofm_objectives import neurofm_loss

# Rates that are not multiples of one another: a mask or warp placed in samples instead of seconds
# would land at different times in each modality.
RATES = {"eeg": 128.0, "resp": 40.0, "ecg": 64.0}
CHANNELS = {"eeg": 3, "resp": 2, "ecg": 1}  # valid channels; one padding channel (id 0) follows
FIRST_ID = {"eeg": 1, "resp": 10, "ecg": 20}
CONTEXT_S, WINDOW_S = 4.0, 5.0
MANIFEST = {"context_s": CONTEXT_S, "modalities": {m: {"rate": r} for m, r in RATES.items()}}
# Per window: which modalities are present. Window 0 has eeg only, window 7 has none.
PRESENT = {"eeg": [1, 1, 1, 1, 1, 1, 1, 0], "resp": [0, 1, 1, 1, 1, 1, 1, 0], "ecg": [0, 0, 1, 0, 1, 0, 1, 0]}
ALL_ON = AugmentConfig(modality_dropout=0.5, noise_std=0.3, time_mask_prob=0.7, time_mask_s=1.3, time_warp=0.2)


def make_window(seed: int = 0, present: dict[str, list[int]] | None = None) -> dict[str, SeriesInput]:
    """Random full windows; padding channels and absent modalities hold zeros, as the pipeline writes them."""
    present = present or PRESENT
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, rate in RATES.items():
        c, b = CHANNELS[m], len(present[m])
        pres = torch.tensor(present[m], dtype=torch.bool)
        x = torch.randn(b, c + 1, int(WINDOW_S * rate), generator=g)
        x[:, c:] = 0.0
        x[~pres] = 0.0
        chan = torch.cat([torch.arange(FIRST_ID[m], FIRST_ID[m] + c).expand(b, c), torch.zeros(b, 1, dtype=torch.long)], 1)
        out[m] = SeriesInput(x=x, chan=chan, present=pres)
    return out


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def copy(window: dict[str, SeriesInput]) -> dict[str, SeriesInput]:
    return {m: dataclasses.replace(w, x=w.x.clone(), chan=w.chan.clone(), present=w.present.clone()) for m, w in window.items()}


def valid(w: SeriesInput) -> torch.Tensor:
    """[B, C] channels that hold data: not padding, modality present."""
    return (w.chan > 0) & w.present[:, None]


# ---------------------------------------------------------------------------------------------
# The augmentations
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [AugmentConfig(), AugmentConfig(time_warp=0.0, time_mask_s=1.0),
                                 AugmentConfig(time_mask_prob=0.5, time_mask_s=0.0)])
def test_all_off_returns_the_window_itself_without_drawing(cfg):
    window, g = make_window(), gen()
    state = g.get_state()
    assert augment_window(window, cfg, MANIFEST, g) is window
    assert torch.equal(g.get_state(), state)


def test_warp_by_one_is_exact_identity():
    x = make_window()["eeg"].x
    assert torch.equal(_resample(x, torch.ones(x.shape[0])), x)


def test_shapes_dtypes_chan_padding_and_absent_modalities_kept():
    window = make_window()
    before = copy(window)
    out = augment_window(window, ALL_ON, MANIFEST, gen())
    assert list(out) == list(window)
    for m, w in out.items():
        assert w.x.shape == window[m].x.shape and w.x.dtype == window[m].x.dtype
        assert torch.equal(w.chan, window[m].chan)
        assert w.present.dtype == torch.bool and w.present.shape == window[m].present.shape
        assert w.hide is not None and w.hide.dtype == torch.bool and w.hide.shape == w.x.shape
        assert not torch.equal(w.x, window[m].x)  # something did happen
        # Padding channels and absent modalities (including the ones dropped here) stay zero.
        assert (w.x[~valid(w)] == 0).all()
        assert not (w.present & ~window[m].present).any()  # nothing becomes present
    for m in window:  # the input was not modified in place
        assert torch.equal(window[m].x, before[m].x) and torch.equal(window[m].present, before[m].present)
        assert window[m].hide is None


def test_modality_dropout_removes_only_present_modalities_and_keeps_one():
    cfg = AugmentConfig(modality_dropout=0.9)
    window = make_window()
    pres_in = torch.stack([window[m].present for m in window], 1)
    dropped = 0
    for seed in range(20):
        out = augment_window(window, cfg, MANIFEST, gen(seed))
        assert list(out) == list(window)  # never a key less: FSDP needs the same parameters on every rank
        pres_out = torch.stack([out[m].present for m in out], 1)
        assert not (pres_out & ~pres_in).any()
        assert torch.equal(pres_out.any(1), pres_in.any(1))  # a window that had a modality keeps one
        assert torch.equal(pres_out[0], pres_in[0])  # window 0 had only eeg: never dropped
        for m in window:
            kept, gone = out[m].present, window[m].present & ~out[m].present
            assert torch.equal(out[m].x[kept], window[m].x[kept])  # untouched where kept
            assert (out[m].x[gone] == 0).all()
        dropped += int((pres_in & ~pres_out).sum())
    assert dropped > 0


def test_modality_dropout_rate():
    """Two present modalities, p = 0.5: each is dropped with p, except that when both draw a drop one
    stays (the higher draw), so the rate is p - p^2 / 2 = 0.375."""
    b = 4000
    window = make_window(present={m: [1] * b if m != "ecg" else [0] * b for m in RATES})
    out = augment_window(window, AugmentConfig(modality_dropout=0.5), MANIFEST, gen())
    for m in ("eeg", "resp"):
        rate = 1 - out[m].present.float().mean().item()
        assert abs(rate - 0.375) < 0.03, (m, rate)
    assert (out["eeg"].present | out["resp"].present).all()
    assert not out["ecg"].present.any()


def test_noise_has_the_requested_std_on_valid_channels_only():
    window = make_window()
    out = augment_window(window, AugmentConfig(noise_std=0.3), MANIFEST, gen())
    for m, w in out.items():
        diff = w.x - window[m].x
        v = valid(w)
        assert torch.equal(w.present, window[m].present)
        assert (diff[~v] == 0).all()
        d = diff[v]
        assert abs(d.std().item() - 0.3) < 0.03 and abs(d.mean().item()) < 0.03, m


def hidden_times(w: SeriesInput, b: int, rate: float) -> torch.Tensor:
    """Times (s) of the samples hidden in window b, after checking that every channel hides the same
    ones and that they are one contiguous run."""
    h = w.hide[b]
    assert (h == h[0]).all()  # every channel, padding included, at the same samples
    idx = h[0].nonzero().flatten()
    if len(idx):
        assert torch.equal(idx, torch.arange(idx[0], idx[-1] + 1))
    return idx.double() / rate


def test_time_mask_hides_one_span_at_the_same_seconds_in_every_modality():
    span = 1.3
    window = make_window(present={m: [1] * 64 for m in RATES})
    out = augment_window(window, AugmentConfig(time_mask_prob=0.5, time_mask_s=span), MANIFEST, gen())
    masked, starts = 0, set()
    for b in range(64):
        times = {m: hidden_times(out[m], b, RATES[m]) for m in out}
        if not len(times["eeg"]):
            assert all(len(t) == 0 for t in times.values())  # no span in this window, anywhere
            continue
        masked += 1
        starts.add(round(times["eeg"][0].item(), 2))
        for m, t in times.items():
            period = 1 / RATES[m]
            assert len(t) in (int(span * RATES[m]), int(span * RATES[m]) + 1)
            assert t[-1] < CONTEXT_S  # inside the context: the future is never hidden
            # Same seconds: every modality's first and last hidden sample lie within one sample
            # period (of the slower one) of eeg's.
            tol = max(period, 1 / RATES["eeg"])
            assert abs(t[0] - times["eeg"][0]) < tol and abs(t[-1] - times["eeg"][-1]) < tol
    assert 16 < masked < 48  # about time_mask_prob of the windows
    assert len(starts) > 10  # at random places
    for m in out:  # only hide changes
        assert torch.equal(out[m].x, window[m].x) and torch.equal(out[m].present, window[m].present)


# The tiny NeuroFM of tests/test_neurofm_model.py: patches of 0.25 s, so eeg/ecg at 32 Hz, resp at 8 Hz.
MODS = {"eeg": 8, "ecg": 8, "resp": 2}
N, HORIZONS, PATCH_S = 4, [1, 2], 0.25
MODEL_MANIFEST = {"context_s": N * PATCH_S, "modalities": {m: {"rate": p / PATCH_S} for m, p in MODS.items()}}


def model_window(b: int = 8, seed: int = 0) -> dict[str, SeriesInput]:
    g = torch.Generator().manual_seed(seed)
    t = N + max(HORIZONS)
    ids = {"eeg": 1, "ecg": 70, "resp": 80}
    return {m: SeriesInput(x=torch.randn(b, 2, t * p, generator=g), chan=torch.arange(ids[m], ids[m] + 2).expand(b, 2).clone(),
                           present=torch.ones(b, dtype=torch.bool)) for m, p in MODS.items()}


def job(augment: AugmentConfig | None = None) -> JobConfig:
    cfg = load_config(None, ["model_type=neurofm", "train.strategy=fsdp", "model.flavour=tiny"])
    model = dataclasses.replace(cfg.model, modalities=list(MODS), patch_lens=list(MODS.values()), context_patches=N,
                                horizon_patches=HORIZONS, n_channel_ids=100)
    return dataclasses.replace(cfg, model=model, data=dataclasses.replace(cfg.data, augment=augment or AugmentConfig()))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return NeuroTask(job(), {"manifest": MODEL_MANIFEST}).build_model().eval()


def test_time_masked_samples_stay_loss_targets(model):
    """The encoder does not see the hidden span, the reconstruction targets still hold it."""
    # Plain MSE forecasts: scored against persistence, the loss also reads the true last context
    # sample (the normaliser), which this test changes on purpose.
    cfg = dataclasses.replace(job().model, forecast_vs_persistence=False)
    window = augment_window(model_window(), AugmentConfig(time_mask_prob=1.0, time_mask_s=0.75), MODEL_MANIFEST, gen())
    changed = {m: dataclasses.replace(w, x=w.x.masked_fill(w.hide, 3.0)) for m, w in window.items()}
    with torch.no_grad():
        a = neurofm_loss(model, window, cfg, 0, gen(1))
        b = neurofm_loss(model, changed, cfg, 0, gen(1))
        # Control: without `hide` the same change reaches the encoder.
        plain = {m: dataclasses.replace(w, hide=None) for m, w in changed.items()}
        c = neurofm_loss(model, plain, cfg, 0, gen(1))
    assert torch.equal(a.forecast, b.forecast) and torch.equal(a.contrastive, b.contrastive)  # same model outputs
    assert (b.recon - a.recon).abs() > 0.1  # scored against the (changed) true samples
    assert not torch.equal(c.forecast, b.forecast)


def test_time_warp_resamples_every_modality_by_one_factor_about_the_window_end():
    """On x = the sample's own time t, a warp by r gives clamp(t_end - (t_end - t) * r, 0, last sample's time)."""
    w_max = 0.3
    window = make_window(present={m: [1] * 16 for m in RATES})
    ramp = {m: dataclasses.replace(w, x=(torch.arange(w.x.shape[2]) / RATES[m]).expand_as(w.x) * valid(w)[..., None])
            for m, w in window.items()}
    out = augment_window(ramp, AugmentConfig(time_warp=w_max), MANIFEST, gen())
    factors = []
    for b in range(16):
        r = {}
        for m, w in out.items():
            t = w.x.shape[2]
            mid = w.x[b, 0, t // 2].item() * RATES[m]  # the source position read at the middle (never clamped)
            r[m] = (t - mid) / (t - t // 2)
            expected = (t - (t - torch.arange(t)) * r[m]).clamp(0, t - 1) / RATES[m]
            torch.testing.assert_close(w.x[b, :CHANNELS[m]], expected.expand(CHANNELS[m], t).float(), atol=2e-4, rtol=0)
            assert (w.x[b, CHANNELS[m]:] == 0).all()
        assert max(r.values()) - min(r.values()) < 1e-4  # one factor for every modality
        assert 1 - w_max <= r["eeg"] <= 1 + w_max
        factors.append(r["eeg"])
    assert min(factors) < 0.95 and max(factors) > 1.05


def test_same_generator_seed_same_augmentation():
    window = make_window()
    a, b = (augment_window(window, ALL_ON, MANIFEST, gen(3)) for _ in range(2))
    c = augment_window(window, ALL_ON, MANIFEST, gen(4))
    for m in window:
        assert torch.equal(a[m].x, b[m].x) and torch.equal(a[m].present, b[m].present) and torch.equal(a[m].hide, b[m].hide)
    assert any(not torch.equal(a[m].x, c[m].x) for m in window)


# ---------------------------------------------------------------------------------------------
# The training step's hook
# ---------------------------------------------------------------------------------------------


def step_loss(model, augment: AugmentConfig | None, train: bool, step: int = 3) -> torch.Tensor:
    task = NeuroTask(job(augment), {"manifest": MODEL_MANIFEST})  # a fresh task: a fresh step generator
    with torch.no_grad():
        return task.step(model, model_window(), step, torch.device("cpu"), train=train).loss


def test_task_augments_training_steps_only(model):
    on = dataclasses.replace(ALL_ON, time_mask_s=0.5)  # the tiny model's context is 1 s
    assert torch.equal(step_loss(model, None, train=False), step_loss(model, on, train=False))
    trained = step_loss(model, on, train=True)
    assert not torch.equal(step_loss(model, None, train=True), trained)
    # What the hook does: the augmentation, then the loss, both from the step's generator.
    cfg = job(on)
    g = NeuroTask(cfg, {"manifest": MODEL_MANIFEST}).generator(3)
    with torch.no_grad():
        expected = neurofm_loss(model, augment_window(model_window(), on, MODEL_MANIFEST, g), cfg.model, 3, g).total
    assert torch.equal(trained, expected)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

NEURO = ["model_type=neurofm", "train.strategy=fsdp"]


def test_augment_config_loads_and_travels_to_the_workers():
    cfg = load_config(None, [*NEURO, "data.augment.modality_dropout=0.2", "data.augment.noise_std=0.05",
                             "data.augment.time_mask_prob=0.5", "data.augment.time_mask_s=0.5", "data.augment.time_warp=0.1"])
    assert cfg.data.augment == AugmentConfig(0.2, 0.05, 0.5, 0.5, 0.1) and cfg.data.augment.enabled
    assert JobConfig.from_dict(cfg.to_dict()) == cfg  # how Ray workers rebuild it
    assert not load_config(None, NEURO).data.augment.enabled  # all off by default


@pytest.mark.parametrize("overrides, field, valid_range", [
    (["data.augment.modality_dropout=1.0"], "data.augment.modality_dropout", "[0, 1)"),
    (["data.augment.modality_dropout=-0.1"], "data.augment.modality_dropout", "[0, 1)"),
    (["data.augment.noise_std=-0.1"], "data.augment.noise_std", ">= 0"),
    (["data.augment.noise_std=.nan"], "data.augment.noise_std", ">= 0"),
    (["data.augment.time_mask_prob=1.5"], "data.augment.time_mask_prob", "[0, 1]"),
    (["data.augment.time_mask_prob=0.5"], "data.augment.time_mask_s", "(0, data.context_s=4.0)"),
    (["data.augment.time_mask_prob=0.5", "data.augment.time_mask_s=4.0"], "data.augment.time_mask_s", "(0, data.context_s"),
    (["data.augment.time_warp=0.6"], "data.augment.time_warp", "[0, 0.5]"),
    (["data.augment.time_warp=0.5", "data.context_s=1.0", "data.horizons_s=[2.0]"], "data.augment.time_warp", "below 0.5"),
    (["data.augment.time_wrap=0.1"], "data.augment.time_wrap", "valid keys"),
    (["data.augment.noise_std=high"], "data.augment.noise_std", "expected float"),
])
def test_bad_augment_config_names_field_and_range(overrides, field, valid_range):
    with pytest.raises(ConfigError) as e:
        load_config(None, [*NEURO, *overrides])
    assert field in str(e.value) and valid_range in str(e.value), str(e.value)


def test_augment_is_not_part_of_the_dataset():
    """The build's fingerprint and the plan its Ray tasks write from ignore data.augment: changing it
    neither rebuilds the dataset nor changes a Parquet row."""
    from pipelines.series_prep import plan_layout
    from pipelines.timeseries import _fingerprint

    off = load_config(None, NEURO).data
    on = dataclasses.replace(off, augment=ALL_ON)
    assert _fingerprint(on, []) == _fingerprint(off, [])
    assert plan_layout(on) == plan_layout(off)
    # Control: a data field that does change the output changes the fingerprint.
    assert _fingerprint(dataclasses.replace(off, hop_s=1.0), []) != _fingerprint(off, [])
