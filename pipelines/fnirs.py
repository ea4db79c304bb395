"""fNIRS: raw light intensity at two wavelengths -> haemoglobin concentration changes (HbO, HbR).

    intensity I(t) at 760 and 850 nm --optical density--> dOD = -log10(I / mean I)
    dOD(760), dOD(850) --modified Beer-Lambert, per channel--> dHbO, dHbR in micromolar

The modified Beer-Lambert law says dOD(l) = (eps_HbO(l) dHbO + eps_HbR(l) dHbR) * d * DPF(l) for a
source-detector distance d; with two wavelengths that is a 2x2 system per channel. Extinction
coefficients are Prahl's tabulated molar values (cm^-1/M, decadic, omlc.org/spectra/hemoglobin);
DPF is one constant for both wavelengths (6, a usual adult value: its exact value scales the result
and the pipeline normalises every channel anyway, but it keeps the units honest).

The file format read here is the netCDF4 (HDF5) file that xarray writes and pyphysio uses for its
`fnirs.ph` sample: a `signal` dataset [time, channel, wavelength] of raw intensity with attrs
`sampling_freq`, `Lambda` (nm) and `Channels` (flattened [channel, source, detector, distance_cm]
rows, with `Channels_shape`), and a `time` dataset in seconds.
"""

from __future__ import annotations

import h5py
import numpy as np

# Prahl's molar extinction coefficients (cm^-1 / M, base 10) as (HbO, HbR), by wavelength in nm.
EXTINCTION = {760: (1486.5865, 3843.707), 850: (2526.391, 1798.643)}
DPF = 6.0  # differential pathlength factor
SHORT_CHANNEL_CM = 1.0  # channels closer than this see the scalp, not the cortex


def optical_density(intensity: np.ndarray) -> np.ndarray:
    """dOD = -log10(I / mean over time of I), along the last (time) axis; intensity must be positive."""
    if (intensity <= 0).any():
        raise ValueError("raw fNIRS intensity must be positive to take its optical density")
    return -np.log10(intensity / intensity.mean(axis=-1, keepdims=True))


def beer_lambert(od: np.ndarray, wavelengths: tuple[int, int], distance_cm: np.ndarray,
                 dpf: float = DPF) -> tuple[np.ndarray, np.ndarray]:
    """(dHbO, dHbR) in micromolar, each [C, N], from od [2, C, N] at the two wavelengths."""
    missing = [w for w in wavelengths if w not in EXTINCTION]
    if missing:
        raise ValueError(f"no extinction coefficients for {missing} nm; tabulated: {sorted(EXTINCTION)}")
    e = np.array([EXTINCTION[w] for w in wavelengths])  # [wavelength, (HbO, HbR)]
    path = (distance_cm * dpf)[:, None]  # [C, 1] cm
    conc = np.linalg.solve(e, od.reshape(2, -1)).reshape(od.shape)  # [(HbO, HbR), C, N] in M * cm
    return conc[0] / path * 1e6, conc[1] / path * 1e6


def read_fnirs_netcdf(path: str) -> tuple[np.ndarray, float, list[str], np.ndarray]:
    """(data [2C, N] = HbO of every channel then HbR, rate Hz, names, distance_cm [C]) of one file."""
    with h5py.File(path, "r") as f:
        sig = f["signal"]
        raw = np.asarray(sig[()], dtype=np.float64)  # [time, channel, wavelength]
        rate = float(np.asarray(sig.attrs["sampling_freq"]).ravel()[0])
        lam = tuple(int(round(float(v))) for v in np.asarray(sig.attrs["Lambda"]).ravel())
        chans = np.asarray(sig.attrs["Channels"]).reshape(tuple(int(v) for v in np.asarray(sig.attrs["Channels_shape"])))
        times = np.asarray(f["time"][()], dtype=np.float64) if "time" in f else None
    if raw.ndim != 3 or raw.shape[2] != 2 or len(lam) != 2:
        raise ValueError(f"expected signal [time, channel, 2 wavelengths], got {raw.shape} at {lam} nm")
    if times is not None and len(times) > 1:
        measured = (len(times) - 1) / (times[-1] - times[0])
        if abs(measured - rate) > 1e-3 * rate:
            raise ValueError(f"sampling_freq says {rate:g} Hz but the time stamps say {measured:g} Hz")
    od = optical_density(raw.transpose(2, 1, 0))  # [wavelength, channel, time]
    distance = chans[:, 3].astype(np.float64)
    hbo, hbr = beer_lambert(od, lam, distance)
    pairs = [f"S{int(s) + 1}_D{int(d) + 1}" for _, s, d, _ in chans]
    names = [f"{p} hbo" for p in pairs] + [f"{p} hbr" for p in pairs]
    return np.concatenate([hbo, hbr]), rate, names, distance


def read_netcdf_series(path: str) -> tuple[np.ndarray, float]:
    """A 1-D `signal` of the same format (pyphysio's `fnirs_tapping.ph` labels) and its rate."""
    with h5py.File(path, "r") as f:
        sig = f["signal"]
        return np.asarray(sig[()]).ravel(), float(np.asarray(sig.attrs["sampling_freq"]).ravel()[0])
