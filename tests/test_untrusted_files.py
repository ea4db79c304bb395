"""No pickle from a directory a user may have received: an export, an adapter or a datastore that holds a
pickle payload is refused with a message naming the file, before anything in it is read."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from neuraflex_ray.checkpoint.adapters import read_adapter, save_adapter
from neuraflex_ray.checkpoint.export import load_exported
from neuraflex_ray.checkpoint.untrusted import PickleRefused, is_pickle, is_safetensors
from neuraflex_ray.memory.store import Datastore

LEGACY_EXPORT = Path(__file__).resolve().parent / "fixtures" / "legacy" / "moe" / "export"


class Boom:
    """What an attacker's pickle would carry: unpickling it runs code."""

    def __reduce__(self):
        return (exec, ("raise SystemExit('the payload ran')",))


@pytest.fixture()
def export(tmp_path):
    out = tmp_path / "export"
    shutil.copytree(LEGACY_EXPORT, out)
    return out


def test_a_clean_export_loads_and_its_weights_are_safetensors(export):
    model, meta = load_exported(export)
    assert sum(p.numel() for p in model.parameters()) > 0 and meta["model_type"]
    assert is_safetensors(export / "model.safetensors") and not is_pickle(export / "model.safetensors")


@pytest.mark.parametrize("kind", ["torch_save", "raw_pickle"])
def test_an_export_holding_a_pickle_is_refused_naming_it(export, kind):
    if kind == "torch_save":
        torch.save({"w": torch.zeros(2), "x": Boom()}, export / "pytorch_model.bin")
        name = "pytorch_model.bin"
    else:  # a pickle dressed as the weights file
        (export / "model.safetensors").write_bytes(pickle.dumps(Boom()))
        name = "model.safetensors"
    with pytest.raises(PickleRefused, match=rf"export .*{name} is a pickle payload"):
        load_exported(export)


def test_an_adapter_holding_a_pickle_is_refused(tmp_path, export):
    out = save_adapter({"w.lora_A": torch.zeros(2, 2)}, {"base_fingerprint": "x"}, tmp_path / "adapter")
    (out / "extra.pt").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(PickleRefused, match=r"adapter .*extra\.pt"):
        read_adapter(out, export)


def test_a_datastore_holding_a_pickle_is_refused(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_text("{}")
    (store / "values.pkl").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(PickleRefused, match=r"datastore .*values\.pkl"):
        Datastore(store)
