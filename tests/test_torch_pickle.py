"""Reading .pth files without torch (fixtures made by tests/data/make_pth_fixtures.py, torch 2.13)."""
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from detr_jax import torch_pickle
from detr_jax.convert import load_state_dict_file

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("name", ["tiny_zip.pth", "tiny_legacy.pth"])
def test_reads_both_torch_formats(name):
    expected = dict(np.load(DATA / "tiny_expected.npz"))
    obj = torch_pickle.load(DATA / name)
    assert obj["epoch"] == 499
    assert obj["args"].state == {"lr": 1e-4, "backbone": "resnet50"}  # argparse.Namespace, inert
    model = obj["model"]
    assert list(model) == list(expected)
    for key, want in expected.items():
        got = model[key]
        assert got.shape == want.shape, key
        np.testing.assert_array_equal(np.asarray(got, want.dtype), want, err_msg=key)
    assert model["bf16"].dtype.name == "bfloat16" and model["half"].dtype == np.float16
    assert model["long"].dtype == np.int64 and model["flag"].dtype == np.bool_


def test_state_dict_from_model_entry():
    state_dict = load_state_dict_file(DATA / "tiny_legacy.pth")
    assert "conv.weight" in state_dict and state_dict["conv.weight"].shape == (3, 2, 3, 3)


class _Boom:
    def __reduce__(self):
        import os
        return os.system, ("echo pwned > /dev/null",)


def test_pickled_code_is_never_run(tmp_path):
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"model": {}, "x": _Boom()}, protocol=2))
    obj = torch_pickle.load(path)
    assert isinstance(obj["x"], torch_pickle.Opaque)  # os.system became an inert record
    assert obj["x"].args == ("echo pwned > /dev/null",)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "x.pth"
    path.write_bytes(pickle.dumps("hello"))
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        torch_pickle.load(path)
