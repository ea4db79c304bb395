"""NeuroFM model and objectives on CPU with a tiny config (no Ray, no process group)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from neuraflex_ray.config import CurriculumStage, load_config
from neuraflex_ray.models.neurofm import NeuroFM, SeriesInput, neurofm_flops_per_window, param_count
from neuraflex_ray.models.neurofm_objectives import active_stage, keep_at_most, neurofm_loss

MODS = {"eeg": 8, "ecg": 8, "resp": 2}  # modality -> samples per patch
N, HORIZONS = 4, [1, 2]
FIRST_ID = {"eeg": 1, "ecg": 70, "resp": 80}  # channel ids of each modality start here


def tiny_cfg(**kw):
    # init_std 0.2: embeddings on the scale of the (fan-in initialised) patch content; see NeuroFM.init_weights.
    cfg = load_config(None, ["model_type=neurofm", "train.strategy=fsdp", "model.flavour=tiny"]).model
    return dataclasses.replace(cfg, modalities=list(MODS), patch_lens=list(MODS.values()), context_patches=N,
                               horizon_patches=HORIZONS, n_channel_ids=100, **{"init_std": 0.2, **kw})


def make_window(b=4, chans=None, full=True, seed=0):
    """Random window; `full` adds the future patches (what neurofm_loss takes)."""
    chans = chans or {"eeg": 3, "ecg": 1, "resp": 1}
    g = torch.Generator().manual_seed(seed)
    n = N + max(HORIZONS) if full else N
    return {m: SeriesInput(x=torch.randn(b, c, n * MODS[m], generator=g),
                           chan=torch.arange(FIRST_ID[m], FIRST_ID[m] + c).expand(b, c).clone(),
                           present=torch.ones(b, dtype=torch.bool))
            for m, c in chans.items()}


def context(window):
    return {m: dataclasses.replace(w, x=w.x[..., : N * MODS[m]]) for m, w in window.items()}


def new_model(seed=0, **kw):
    torch.manual_seed(seed)
    return NeuroFM(tiny_cfg(**kw))


@pytest.fixture(scope="module")
def model():
    return new_model().eval()


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_output_shapes(model):
    cfg = model.cfg
    out = model(context(make_window(b=2)))
    assert out.latents.shape == (2, cfg.n_latents, cfg.dim)
    assert out.embedding.shape == (2, cfg.dim)
    for m, c in {"eeg": 3, "ecg": 1, "resp": 1}.items():
        assert out.recon[m].shape == (2, c, N, MODS[m])
        assert out.forecast[m].shape == (2, c, len(HORIZONS), MODS[m])
    assert out.modality_embeddings == {}
    assert model.embed(context(make_window(b=2))).shape == (2, cfg.dim)


@pytest.mark.parametrize("channels", [1, 3, 64])
def test_any_channel_count(model, channels):
    out = model(context(make_window(b=2, chans={"eeg": channels, "ecg": 1})))
    assert out.recon["eeg"].shape == (2, channels, N, MODS["eeg"])
    assert out.forecast["eeg"].shape == (2, channels, len(HORIZONS), MODS["eeg"])
    assert torch.isfinite(out.embedding).all()


def test_hidden_patch_is_hidden(model):
    inputs = context(make_window(b=2))
    mask = {m: torch.zeros(w.x.shape[0], w.x.shape[1], N, dtype=torch.bool) for m, w in inputs.items()}
    mask["eeg"][0, 1, 2] = True
    changed = context(make_window(b=2))
    changed["eeg"] = dataclasses.replace(inputs["eeg"], x=inputs["eeg"].x.clone())
    p = MODS["eeg"]
    changed["eeg"].x[0, 1, 2 * p:3 * p] = torch.tensor(float("nan"))  # even NaN must not leak
    changed = {**inputs, "eeg": changed["eeg"]}
    with torch.no_grad():
        a, b = model(inputs, mask), model(changed, mask)
    assert torch.equal(a.latents, b.latents)
    assert all(torch.equal(a.recon[m], b.recon[m]) and torch.equal(a.forecast[m], b.forecast[m]) for m in inputs)
    # Control: the same change on a visible patch does move the output.
    changed["eeg"].x[0, 1, 2 * p:3 * p] = 5.0
    with torch.no_grad():
        c = model(changed)
    assert not torch.allclose(a.latents[0], c.latents[0])


def test_padded_channels_and_absent_modality_do_not_matter(model):
    inputs = context(make_window(b=2, chans={"eeg": 3, "ecg": 1}))
    padded = dict(inputs)
    e = inputs["eeg"]
    padded["eeg"] = SeriesInput(x=torch.cat([e.x, 7 * torch.randn(2, 2, e.x.shape[2])], 1),
                                chan=torch.cat([e.chan, torch.zeros(2, 2, dtype=torch.long)], 1), present=e.present)
    # An absent modality (present False) carries garbage: it must be ignored like a missing key.
    absent = dict(inputs, resp=SeriesInput(x=100 * torch.randn(2, 1, N * MODS["resp"]), chan=torch.full((2, 1), 80),
                                           present=torch.zeros(2, dtype=torch.bool)))
    with torch.no_grad():
        ref = model(inputs)
        for other in (model(padded), model(absent)):
            assert torch.allclose(other.embedding, ref.embedding, atol=1e-5)
            for m in inputs:  # the real channels' outputs too
                assert torch.allclose(other.recon[m][:, :inputs[m].x.shape[1]], ref.recon[m], atol=1e-5)
                assert torch.allclose(other.forecast[m][:, :inputs[m].x.shape[1]], ref.forecast[m], atol=1e-5)
        # Padded and absent cells are not computed: their outputs are zeros.
        assert not model(padded).recon["eeg"][:, 3:].any() and not model(absent).forecast["resp"].any()


def test_a_windows_outputs_do_not_depend_on_its_batch(model):
    """Token-level work runs on real channel rows regrouped per window (neurofm_rows.py): a window
    batched with others of other modalities and channel counts gets what it gets alone."""
    lone = context(make_window(b=1, chans={"eeg": 2, "ecg": 1}, seed=1))
    crowd = context(make_window(b=3, chans={"eeg": 6, "ecg": 1, "resp": 1}, seed=2))
    crowd["ecg"].present[2] = False
    batch = {}
    for m, w in crowd.items():
        x, chan, present = w.x.clone(), w.chan.clone(), w.present.clone()
        x[1], chan[1], present[1] = 0.0, 0, False  # row 1 becomes the lone window
        if m in lone:
            c = lone[m].x.shape[1]
            x[1, :c], chan[1, :c], present[1] = lone[m].x[0], lone[m].chan[0], True
        batch[m] = SeriesInput(x=x, chan=chan, present=present)
    mask = {m: torch.rand(w.x.shape[0], w.x.shape[1], N, generator=torch.Generator().manual_seed(3)) < 0.3
            for m, w in batch.items()}
    with torch.no_grad():
        alone = model(lone, {m: mask[m][1:2, :lone[m].x.shape[1]] for m in lone}, per_modality=True)
        together = model(batch, mask, per_modality=True)
    assert torch.allclose(together.embedding[1], alone.embedding[0], atol=1e-5)
    for m, w in lone.items():
        c = w.x.shape[1]
        assert torch.allclose(together.recon[m][1, :c], alone.recon[m][0], atol=1e-5), m
        assert torch.allclose(together.forecast[m][1, :c], alone.forecast[m][0], atol=1e-5), m
        assert torch.allclose(together.modality_embeddings[m][1], alone.modality_embeddings[m][0], atol=1e-5), m


def test_per_modality_views_equal_encoding_each_modality_alone(model):
    inputs = context(make_window(b=3))
    inputs["ecg"].present[1] = False
    calls = []
    hooks = [blk.register_forward_hook(lambda *_: calls.append(1)) for blk in [*model.cross_blocks, *model.blocks]]
    with torch.no_grad():
        out = model(inputs, per_modality=True)
    for h in hooks:
        h.remove()
    # One call per block per forward, whatever the modality count (FSDP gathers each unit once).
    assert len(calls) == len(model.cross_blocks) + len(model.blocks)
    with torch.no_grad():
        assert torch.allclose(out.embedding, model.embed(inputs), atol=1e-5)
        for m in inputs:
            alone = model.projection(model.embed({m: inputs[m]}))
            assert torch.allclose(out.modality_embeddings[m], alone, atol=1e-5), m


def test_absent_and_missing_modalities_give_finite_loss_and_grads():
    model = new_model()
    cfg = model.cfg
    window = make_window()
    window["ecg"].present[1:3] = False
    window["resp"].present[:] = False  # absent in every window of this rank's batch
    names = {}
    for case, win in [("absent", window), ("missing", {m: window[m] for m in ("eeg", "resp")}),
                      ("nothing present", {m: dataclasses.replace(w, present=torch.zeros(4, dtype=torch.bool))
                                           for m, w in window.items()})]:
        model.zero_grad(set_to_none=True)
        loss = neurofm_loss(model, win, cfg, 0, torch.Generator().manual_seed(0))
        loss.total.backward()
        assert all(torch.isfinite(v) for v in (loss.total, loss.recon, loss.forecast, loss.contrastive)), case
        g = grads(model)
        assert all(torch.isfinite(v).all() for v in g.values()), case
        names[case] = set(g)
    # FSDP: the parameters that get a gradient depend only on the modality keys, not on the data.
    assert names["absent"] == names["nothing present"]
    missing = names["absent"] - names["missing"]
    assert missing and all("ecg" in n for n in missing)


def test_grad_set_depends_only_on_keys_and_step():
    model = new_model(curriculum=[CurriculumStage(0, "multimodal"), CurriculumStage(5, "unimodal")])
    cfg = model.cfg
    sets = []
    for seed, step in [(0, 0), (1, 3), (2, 0), (0, 5), (1, 9)]:
        win = make_window(seed=seed)
        if seed == 1:
            win["ecg"].present[:] = False
        if seed == 2:
            win["eeg"].present[:2] = False
            win["eeg"].chan[2:, 1:] = 0
        model.zero_grad(set_to_none=True)
        neurofm_loss(model, win, cfg, step, torch.Generator().manual_seed(seed)).total.backward()
        sets.append(set(grads(model)))
    assert sets[0] == sets[1] == sets[2]  # multimodal stage
    assert sets[3] == sets[4]  # unimodal stage
    assert sets[0] - sets[3] == {n for n in sets[0] if n.startswith("projection.")}  # no contrastive views


def test_curriculum_switches_at_configured_step():
    model = new_model(curriculum=[CurriculumStage(0, "multimodal"), CurriculumStage(5, "unimodal")])
    cfg = model.cfg
    assert active_stage(cfg, 4).mode == "multimodal" and active_stage(cfg, 5).mode == "unimodal"
    assert active_stage(dataclasses.replace(cfg, curriculum=[]), 10**6).mode == "multimodal"
    late = dataclasses.replace(cfg, curriculum=[CurriculumStage(3, "unimodal")])
    assert active_stage(late, 2).mode == "multimodal" and active_stage(late, 3).mode == "unimodal"  # before any stage
    window = make_window(b=8)
    before = neurofm_loss(model, window, cfg, 4, torch.Generator().manual_seed(0))
    after = neurofm_loss(model, window, cfg, 5, torch.Generator().manual_seed(0))
    assert before.contrastive > 0 and after.contrastive == 0


def test_three_stage_curriculum_keeps_one_then_two_then_all_modalities():
    stages = "[{start_step: 0, mode: unimodal}, {start_step: 10, mode: pairwise}, {start_step: 20, mode: multimodal}]"
    cfg = load_config(None, ["model_type=neurofm", "train.strategy=fsdp", f"model.curriculum={stages}"]).model
    assert [active_stage(cfg, s).mode for s in (0, 9, 10, 19, 20, 10**6)] == [
        "unimodal", "unimodal", "pairwise", "pairwise", "multimodal", "multimodal"]
    present = {m: torch.ones(64, dtype=torch.bool) for m in ("eeg", "ecg", "resp")}
    present["ecg"][:8] = False  # these windows have two modalities only
    for k, want in ((1, 1), (2, 2), (3, 3)):
        kept = keep_at_most(present, k, torch.Generator().manual_seed(k))
        count = torch.stack(list(kept.values())).sum(0)
        assert set(kept) == set(present)  # keys never change: FSDP's gradient set depends on them
        assert torch.equal(count[8:], torch.full((56,), want)) and (count[:8] == min(want, 2)).all()
        assert all((kept[m] <= present[m]).all() for m in kept)
        if k == 2:  # a random pair, not always the same one
            assert len({tuple(int(kept[m][i]) for m in kept) for i in range(8, 64)}) == 3
    model = new_model(curriculum=cfg.curriculum)
    losses = [neurofm_loss(model, make_window(b=8), model.cfg, step, torch.Generator().manual_seed(0)).contrastive
              for step in (5, 15, 25)]
    assert losses[0] == 0 and losses[1] > 0 and losses[2] > 0  # pairs and wholes have something to align


def test_curriculum_modes_are_checked_and_old_configs_still_read():
    from neuraflex_ray.config import ConfigError

    old = load_config(None, ["model_type=neurofm", "train.strategy=fsdp",
                             "model.curriculum=[{start_step: 0, multimodal: false}, {start_step: 5, multimodal: true}]"])
    assert [s.mode for s in old.model.curriculum] == ["unimodal", "multimodal"]
    with pytest.raises(ConfigError, match=r"model.curriculum\[0\].mode"):
        load_config(None, ["model_type=neurofm", "train.strategy=fsdp", "model.curriculum=[{start_step: 0, mode: trimodal}]"])


def test_deterministic_with_fixed_seed_and_generator():
    runs = []
    for _ in range(2):
        model = new_model(seed=3)
        loss = neurofm_loss(model, make_window(), model.cfg, 0, torch.Generator().manual_seed(11))
        loss.total.backward()
        runs.append((loss, grads(model)))
    (a, ga), (b, gb) = runs
    assert torch.equal(a.total, b.total) and torch.equal(a.contrastive, b.contrastive)
    assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)
    model = new_model(seed=3)
    other = neurofm_loss(model, make_window(), model.cfg, 0, torch.Generator().manual_seed(12))
    assert not torch.equal(a.recon, other.recon)  # another generator hides other patches


def sine_window(b, chans, g):
    """Each channel a sine whose frequency is fixed by its channel id; one random phase and
    amplitude per window, shared by every channel and modality (so modalities can be matched)."""
    phase = 2 * math.pi * torch.rand(b, 1, 1, generator=g)
    amp = 0.5 + torch.rand(b, 1, 1, generator=g)
    win = {}
    for m, c in chans.items():
        t = torch.arange((N + max(HORIZONS)) * MODS[m]) / MODS[m]  # in patches
        k = torch.arange(FIRST_ID[m], FIRST_ID[m] + c)[None, :, None]
        x = amp * torch.sin(2 * math.pi * (0.15 + 0.01 * (k % 10)) * t + phase + k)
        win[m] = SeriesInput(x=x, chan=k[..., 0].expand(b, c).clone(), present=torch.ones(b, dtype=torch.bool))
    return win


def test_learns_sines():
    torch.set_num_threads(1)
    model = new_model(seed=0, channel_mask_prob=0.0)  # patch reconstruction only: whole channels are another task
    cfg = model.cfg
    chans = {"eeg": 2, "ecg": 1}
    data, gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for step in range(150):  # half the windows train reconstruction, half forecasting
        loss = neurofm_loss(model, sine_window(8, chans, data), cfg, step, gen)
        opt.zero_grad()
        loss.total.backward()
        opt.step()
    # Held-out windows: every objective beats its trivial baseline (predicting zero; chance for InfoNCE).
    test = sine_window(16, chans, torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = neurofm_loss(model, test, cfg, 0, torch.Generator().manual_seed(5))
    zero = sum(float(w.x.pow(2).mean()) for w in test.values()) / len(test)
    assert out.recon < 0.8 * zero and out.forecast < 0.5 * zero, (out, zero)
    assert out.contrastive < math.log(16) - 0.5, out


@pytest.mark.parametrize("backbone", ["transformer", "ssm"])
def test_meta_init_and_accounting(backbone):
    cfg = tiny_cfg(backbone=backbone)
    with torch.device("meta"):
        meta = NeuroFM(cfg)
    meta.to_empty(device="cpu")
    meta.init_weights()
    assert all(torch.isfinite(p).all() for p in meta.parameters())
    assert torch.equal(meta.channel_emb.weight[0], torch.zeros(cfg.dim))
    assert param_count(meta) == sum(p.numel() for p in new_model(backbone=backbone).parameters())
    ref = new_model(backbone=backbone).state_dict()
    for name, p in meta.state_dict().items():  # deterministic inits come back exactly after to_empty()
        if name.endswith(("A_log", "D", "dt_bias")):
            assert torch.equal(p, ref[name]), name
    f1, f2 = neurofm_flops_per_window(cfg, 100), neurofm_flops_per_window(cfg, 200)
    assert 0 < f1 < f2 < 2.2 * f1
    assert neurofm_flops_per_window(cfg, 100, contrastive_modalities=0) < f1


def test_forecast_targets_are_the_patches_after_the_context():
    """Context all 0, future all 10, forecast head zeroed: the forecast loss must be 10^2 (it would
    be 0 if the targets were taken from the context), and reconstruction scores the context."""
    model = new_model(forecast_vs_persistence=False)
    for m in MODS:
        torch.nn.init.zeros_(model.forecast_head[m].weight)
        torch.nn.init.zeros_(model.forecast_head[m].bias)
    window = make_window(b=8)
    for m, w in window.items():
        w.x.zero_()
        w.x[..., N * MODS[m]:] = 10.0
    loss = neurofm_loss(model, window, model.cfg, 0, torch.Generator().manual_seed(0))
    assert float(loss.forecast) == pytest.approx(100.0)
    assert float(loss.recon) < 10.0  # targets 0: whatever the head predicts, nowhere near 100
    # Scored against persistence instead, the untrained model (which forecasts persistence) scores 1.
    fresh = new_model()
    relative = neurofm_loss(fresh, window, fresh.cfg, 0, torch.Generator().manual_seed(0))
    assert float(relative.forecast) == pytest.approx(1.0, rel=1e-5)


def test_untrained_forecast_is_persistence(model):
    """The forecast head starts at zero and the persistence share at 1: before any training, every
    horizon forecasts the last context sample, the baseline training has to beat."""
    inputs = context(make_window(b=2))
    with torch.no_grad():
        out = model(inputs)
    for m, w in inputs.items():
        last = w.x[..., -1]  # [B, C]
        assert torch.allclose(out.forecast[m], last[:, :, None, None].expand_as(out.forecast[m]), atol=1e-6), m


def test_local_read_is_axial_and_skips_unseen_tokens():
    """A decoder query at (channel c, patch n) reads tokens at patch n of every channel and of
    channel c at every patch: a token elsewhere, or one that is not visible, cannot move it."""
    from neuraflex_ray.models.neurofm_local import LocalBlock
    from neuraflex_ray.models.neurofm_rows import find_rows

    torch.manual_seed(0)
    block = LocalBlock(tiny_cfg()).eval()
    b, c, n, d = 2, 3, N, tiny_cfg().dim
    q, tokens = torch.randn(b, c, n + 1, d), torch.randn(b, c, n, d)
    seen = torch.ones(b, c, n, dtype=torch.bool)
    seen[0, 2, 1] = False
    rows = find_rows([torch.ones(b, c, dtype=torch.bool)])  # every cell real: rows in (window, channel) order

    def local(t: torch.Tensor) -> torch.Tensor:
        return block(q.flatten(0, 1), t.flatten(0, 1), seen.flatten(0, 1), rows).view(b, c, n + 1, d)

    with torch.no_grad():
        ref = local(tokens)

        def moved(ci: int, ni: int) -> torch.Tensor:
            t = tokens.clone()
            t[0, ci, ni] += 3.0
            return (local(t) - ref)[0].abs().amax(-1) > 1e-6  # [C, N+1]: which queries changed

        off_axis = moved(0, 0)  # channel 0, patch 0 reaches row 0 and column 0 only
        assert off_axis[0].all() and off_axis[:, 0].all()
        assert not off_axis[1:, 1:].any()
        assert not moved(2, 1).any()  # an unseen token reaches nobody
        assert moved(1, n - 1)[:, n].all()  # the last patch reaches every channel's forecast query


def test_contrastive_with_other_ranks_windows_equals_one_big_batch():
    """Each rank contrasts its windows with every rank's: the ranks' losses, weighted by their
    windows, are the InfoNCE of the whole global batch (gradient only through a rank's own rows)."""
    from torch.nn.functional import normalize

    from neuraflex_ray.models.neurofm_objectives import info_nce

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    both = torch.tensor([1, 1, 0, 1, 1, 1, 1, 0], dtype=torch.bool)
    full, ok = info_nce(a, b, both, 0.1)
    losses, counts = [], []
    for rank in (0, 1):
        # What two ranks would all-gather, in the order info_nce asks: normalised a, normalised b, both.
        answers = iter([normalize(a, dim=-1), normalize(b, dim=-1), both.float()])

        def gather(t: torch.Tensor, rank=rank, answers=answers) -> tuple[list[torch.Tensor], int]:
            whole = next(answers)
            return [whole[:4].clone(), whole[4:].clone()], rank

        sl = slice(4 * rank, 4 * rank + 4)
        loss, usable = info_nce(a[sl], b[sl], both[sl], 0.1, gather)
        assert usable
        losses.append(loss)
        counts.append(int(both[sl].sum()))
    combined = sum(loss * n for loss, n in zip(losses, counts, strict=True)) / sum(counts)
    assert ok and torch.allclose(combined, full, atol=1e-5)


def test_spatial_filter_combines_other_seen_channels_linearly():
    """A patch is a signed linear combination of the OTHER seen channels at that patch: never of
    itself, never of an unseen patch, and exactly linear in the samples (the ridge's family)."""
    from neuraflex_ray.models.neurofm_local import SpatialFilter

    torch.manual_seed(0)
    filt = SpatialFilter(tiny_cfg())
    b, c, n, p, d = 2, 4, N, 8, tiny_cfg().dim
    where, x = torch.randn(b, c, d), torch.randn(b, c, n, p)
    seen = torch.ones(b, c, n, dtype=torch.bool)
    seen[0, 3, 1] = False
    with torch.no_grad():
        out = filt(where, x, seen)
        assert torch.allclose(filt(where, 2 * x, seen), 2 * out, atol=1e-5)
        x2 = x.clone()
        x2[0, 0] += 5.0  # channel 0 changes: its own output does not, every other channel's does
        x2[0, 3, 1] = 100.0  # an unseen patch: nobody reads it
        diff = (filt(where, x2, seen) - out)[0].abs().amax(-1)  # [C, N]
        assert (diff[0] < 1e-5).all() and (diff[1:, [0, 2, 3]] > 1e-6).all()
        assert (diff[:, 1] > 1e-6).sum() == 3 and diff[0, 1] < 1e-5
    model = new_model()  # inside NeuroFM it starts silent: reconstruction starts from the decoder alone
    assert torch.count_nonzero(model.spatial_filter.wq.weight) == 0


def test_variance_term_penalises_a_collapsed_embedding_only():
    from neuraflex_ray.models.neurofm_objectives import embedding_variance

    g = torch.Generator().manual_seed(0)
    spread = torch.randn(64, 32, generator=g)
    collapsed = torch.randn(1, 32, generator=g).expand(64, -1) + 1e-3 * torch.randn(64, 32, generator=g)
    assert float(embedding_variance(spread, 0.5)) < 0.01
    assert float(embedding_variance(collapsed, 0.5)) > 0.45
    x = collapsed.clone().requires_grad_(True)
    embedding_variance(x, 0.5).backward()
    stepped = x.detach() - 10.0 * x.grad  # a gradient step spreads the windows apart
    assert float(embedding_variance(stepped, 0.5)) < float(embedding_variance(collapsed, 0.5))
    model = new_model(variance_weight=1.0)
    loss = neurofm_loss(model, make_window(b=8), model.cfg, 0, torch.Generator().manual_seed(0))
    assert float(loss.variance) >= 0 and torch.isfinite(loss.total)
