"""NeuroFM serving, model side: a tiny untrained export, raw streams in, embeddings and forecasts out (no Ray)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from neuraflex_ray.checkpoint import load_exported
from neuraflex_ray.families.neurofm.scratch import SCRATCH_NEURO_MANIFEST, scratch_neurofm_export
from neuraflex_ray.models.neurofm import param_count
from neuraflex_ray.serving.errors import RequestError
from neuraflex_ray.serving.neuro import NeuroPredictor, NeuroRequest, card, parse_arrow, parse_npy

MANIFEST = SCRATCH_NEURO_MANIFEST
RATES = {m: spec["rate"] for m, spec in MANIFEST["modalities"].items()}
HORIZONS_S, CONTEXT_S = MANIFEST["horizons_s"], MANIFEST["context_s"]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return scratch_neurofm_export(tmp_path_factory.mktemp("neuro") / "export")


@pytest.fixture(scope="module")
def predictor(export_dir):
    return NeuroPredictor(*load_exported(export_dir))


def signal(modality: str, rate: float, seconds: float = 3.0, channels: int | None = None) -> np.ndarray:
    """Slow sinusoids (well below the Nyquist rate of every rate used), one phase per channel, the last
    sample at t = `seconds` whatever the rate; float32 so that JSON, Arrow and npy carry the same numbers."""
    c = channels or MANIFEST["modalities"][modality]["max_channels"]
    t = seconds - np.arange(round(seconds * rate))[::-1] / rate
    x = [np.sin(2 * np.pi * 0.7 * t + k) + 0.5 * np.cos(2 * np.pi * 1.3 * t + 2 * k) + 0.1 * k for k in range(c)]
    return np.stack(x).astype(np.float32)


def request(**streams: np.ndarray | tuple[np.ndarray, float]) -> NeuroRequest:
    """request(eeg=x) at the training rate, or request(eeg=(x, rate))."""
    body = []
    for m, v in streams.items():
        x, rate = v if isinstance(v, tuple) else (v, RATES[m])
        body.append({"modality": m, "sampling_rate": rate, "data": x.tolist()})
    return NeuroRequest.model_validate({"streams": body})


def test_embed_shape_and_determinism(predictor):
    req = request(eeg=signal("eeg", 32), ecg=signal("ecg", 16))
    out = predictor.embed(req)
    assert out["dim"] == predictor.model.cfg.dim == len(out["embedding"])
    assert out["modalities"] == ["eeg", "ecg"]
    assert np.isfinite(out["embedding"]).all()
    assert predictor.embed(req) == out  # bit for bit
    assert predictor.embed(request(eeg=signal("eeg", 32)))["modalities"] == ["eeg"]


def test_prepare_window(predictor):
    x = signal("eeg", 32, seconds=5)
    inp = predictor.prepare(request(eeg=x))["eeg"]
    assert inp.x.shape == (1, 3, 64) and inp.present.tolist() == [True]
    assert inp.chan.tolist() == [[4, 2, 3]]  # no names: Fp1, C3, Cz, the session's order
    z = (x[:, -64:] - x[:, -64:].mean(1, keepdims=True)) / x[:, -64:].std(1, keepdims=True)
    np.testing.assert_allclose(inp.x[0].numpy(), z, atol=1e-5)  # the most recent 2 s, normalised per channel
    named = NeuroRequest.model_validate({"streams": [{"modality": "eeg", "sampling_rate": 32, "data": x[:2].tolist(),
                                                      "channels": ["Cz", "Fp1"]}]})
    assert predictor.prepare(named)["eeg"].chan.tolist() == [[3, 4]]


def test_forecast_shape(predictor):
    out = predictor.forecast(request(eeg=signal("eeg", 64), ecg=signal("ecg", 16)))
    assert out["horizons_s"] == HORIZONS_S
    eeg, ecg = out["streams"]
    assert (eeg["modality"], eeg["sampling_rate"], eeg["channels"]) == ("eeg", 32.0, ["Fp1", "C3", "Cz"])
    assert np.asarray(eeg["forecast"]).shape == (3, 2, 8)  # [channels][horizons][patch samples at 32 Hz]
    assert np.asarray(ecg["forecast"]).shape == (1, 2, 4)
    assert eeg["horizon_start_s"] == [1 / 32, 9 / 32]


def test_forecast_in_input_units(predictor):
    """Normalisation is undone: an affine change of a channel changes its forecast the same way."""
    x, e = signal("eeg", 32), signal("ecg", 16)
    base = predictor.forecast(request(eeg=x, ecg=e))
    scale, offset = np.array([10.0, 1.0, 0.001]), np.array([5.0, -300.0, 1e3])
    # float64 through JSON: in float32, 1e3 + 0.001 * x would keep only a few bits of x.
    moved = predictor.forecast(request(eeg=x * scale[:, None] + offset[:, None], ecg=e))
    f0, f1 = np.asarray(base["streams"][0]["forecast"]), np.asarray(moved["streams"][0]["forecast"])
    np.testing.assert_allclose((f1 - offset[:, None, None]) / scale[:, None, None], f0, rtol=1e-4, atol=1e-4)
    assert base["streams"][1] == moved["streams"][1]
    # A constant channel is flat after normalisation; its forecast sits at that level, not at zero.
    flat = predictor.forecast(request(ecg=np.full((1, 48), 800.0, np.float32)))
    assert np.abs(np.asarray(flat["streams"][0]["forecast"]) - 800).max() < 10


@pytest.mark.parametrize(("modality", "rate"), [("eeg", 64.0), ("eeg", 33.0), ("ecg", 32.0)])
def test_resampled_stream_gives_same_embedding(predictor, modality, rate):
    native = predictor.embed(request(**{modality: signal(modality, RATES[modality])}))["embedding"]
    other = predictor.embed(request(**{modality: (signal(modality, rate), rate)}))["embedding"]
    # Within 2% (about 0.5% measured); reversing the signal in time moves it by 35%.
    assert np.abs(np.subtract(native, other)).max() < 0.02 * np.abs(native).max()


def test_only_the_most_recent_window_counts(predictor):
    x = signal("eeg", 32)
    longer = np.concatenate([np.random.default_rng(0).normal(size=(3, 500)).astype(np.float32) * 100, x], axis=1)
    assert predictor.embed(request(eeg=x)) == predictor.embed(request(eeg=longer))


def test_arrow_and_npy_match_json(predictor):
    x, e = signal("eeg", 64), signal("ecg", 16)
    json_req = NeuroRequest.model_validate({"streams": [
        {"modality": "eeg", "sampling_rate": 64, "data": x.tolist(), "channels": ["Fp1", "C3", "Cz"]},
        {"modality": "ecg", "sampling_rate": 16, "data": e.tolist()}]})
    table = pa.table({"modality": ["eeg", "ecg"], "sampling_rate": [64.0, 16.0],
                      "data": pa.array([x.tolist(), e.tolist()], pa.list_(pa.list_(pa.float32()))),
                      "channels": pa.array([["Fp1", "C3", "Cz"], None], pa.list_(pa.string()))})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    arrow_req = parse_arrow(sink.getvalue().to_pybytes())
    assert predictor.embed(arrow_req) == predictor.embed(json_req)
    assert predictor.forecast(arrow_req) == predictor.forecast(json_req)

    buf = io.BytesIO()
    np.save(buf, x)
    npy_req = parse_npy(buf.getvalue(), "eeg", 64.0, None)
    assert predictor.embed(npy_req) == predictor.embed(request(eeg=(x, 64.0)))


def stream(**kw):
    return {"modality": "eeg", "sampling_rate": 32.0, "data": signal("eeg", 32).tolist(), **kw}


def arrow_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


BAD = {
    "no streams": ([], "streams"),
    "unknown modality": ([stream(modality="fmri")], "streams[0].modality"),
    "zero rate": ([stream(sampling_rate=0.0)], "streams[0].sampling_rate"),
    "negative rate": ([stream(sampling_rate=-32.0)], "streams[0].sampling_rate"),
    "unresamplable rate": ([stream(sampling_rate=1e7)], "streams[0].sampling_rate"),
    "nan": ([stream(data=[[0.0] * 64, [0.0] * 63 + [float("nan")], [0.0] * 64])], "streams[0].data"),
    "ragged rows": ([stream(data=[[0.0] * 64, [0.0] * 63, [0.0] * 64])], "streams[0].data"),
    "too short": ([stream(), stream(modality="ecg", sampling_rate=160.0, data=[[0.0] * 300])], "streams[1].data"),
    "unknown channel": ([stream(data=[[0.0] * 64] * 2, channels=["Cz", "O1"])], "streams[0].channels[1]"),
    "repeated channel": ([stream(data=[[0.0] * 64] * 2, channels=["Cz", "Cz"])], "streams[0].channels[1]"),
    "names vs rows": ([stream(channels=["Cz", "C3"])], "streams[0].channels"),
    "unnamed subset": ([stream(data=[[0.0] * 64] * 2)], "streams[0].channels"),
    "too many channels": ([stream(modality="ecg", sampling_rate=16.0, data=[[0.0] * 32] * 2, channels=["II", "II"])],
                          "streams[0].data"),
    "duplicate modality": ([stream(), stream()], "streams[1].modality"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_json_request(predictor, case):
    streams, param = BAD[case]
    with pytest.raises(RequestError) as e:
        predictor.embed(NeuroRequest.model_validate({"streams": streams}))
    assert e.value.param == param and e.value.status == 400


def test_too_short_names_the_minimum(predictor):
    with pytest.raises(RequestError, match="at least 311"):  # 2 s at 16 Hz: 31 steps of 10 samples, + 1
        predictor.forecast(request(ecg=(np.zeros((1, 100), np.float32), 160.0)))


def test_too_many_channels(predictor):
    with pytest.raises(RequestError) as e:
        predictor.embed(NeuroRequest.model_validate({"streams": [stream(data=[[0.0] * 64] * 4,
                                                                        channels=["Fp1", "C3", "Cz", "C3"])]}))
    assert e.value.param == "streams[0].data" and "at most 3" in e.value.message


def test_unknown_json_field():
    with pytest.raises(ValidationError):
        NeuroRequest.model_validate({"streams": [stream(units="uV")]})
    with pytest.raises(ValidationError):
        NeuroRequest.model_validate({"streams": [], "window": 3})
    assert NeuroRequest.model_validate({"streams": [], "model": "neurofm"}).model == "neurofm"


def test_bad_binary_bodies(predictor):
    good = pa.table({"modality": ["eeg"], "sampling_rate": [32.0],
                     "data": pa.array([signal("eeg", 32).tolist()], pa.list_(pa.list_(pa.float32())))})
    body = arrow_bytes(good)
    for bad in (b"", b"not arrow", body[: len(body) // 2]):
        with pytest.raises(RequestError) as e:
            parse_arrow(bad)
        assert e.value.param == "body"
    with pytest.raises(RequestError) as e:
        parse_arrow(arrow_bytes(good.append_column("units", pa.array(["uV"]))))
    assert e.value.param == "body"
    ragged = good.set_column(2, "data", pa.array([[[0.0] * 64, [0.0] * 63]], pa.list_(pa.list_(pa.float32()))))
    with pytest.raises(RequestError) as e:
        parse_arrow(arrow_bytes(ragged))
    assert e.value.param == "streams[0].data"

    buf = io.BytesIO()
    np.save(buf, signal("eeg", 32))
    for bad in (b"", b"\x93NUMPY garbage", buf.getvalue()[:200]):
        with pytest.raises(RequestError) as e:
            parse_npy(bad, "eeg", 32.0, None)
        assert e.value.param == "body"
    buf = io.BytesIO()
    np.save(buf, np.array([["a", "b"]]))
    with pytest.raises(RequestError):
        parse_npy(buf.getvalue(), "eeg", 32.0, None)


def test_card(export_dir):
    model, meta = load_exported(export_dir)
    c = card(meta)
    assert c["modalities"]["eeg"]["sampling_rate"] == 32.0
    assert c["modalities"]["eeg"]["channels"] == ["Fp1", "C3", "Cz"]
    assert c["modalities"]["ecg"]["channels"] == ["II"]
    assert (c["context_s"], c["horizons_s"], c["embedding_dim"]) == (CONTEXT_S, HORIZONS_S, model.cfg.dim)
    assert c["parameters"] == param_count(model)
