"""Read PyTorch ``.pth`` files into numpy without torch, and without running pickled code.

Both formats ``torch.save`` has written since 2018 are read: the zip archive (torch >= 1.6, with
``data.pkl`` and one ``data/<key>`` record per storage) and the legacy stream (torch <= 1.5, which
wrote the 2020 DETR model-zoo files: magic number, protocol, system info, the object pickle, the
storage keys, then each storage as an int64 element count and its bytes). Tensors become numpy
arrays (views resolved, copies owning their memory); ``nn.Parameter`` becomes its array.

Unpickling only builds what it recognises (tensors, storages, OrderedDict, the builtins); any other
class in the file (``argparse.Namespace`` of the training args, ...) becomes an inert ``Opaque``
record of its arguments, so a checkpoint can never execute code on load.
"""
import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
SAFE_BUILTINS = {"set", "frozenset", "dict", "list", "tuple", "int", "float", "bool", "str", "bytes",
                 "bytearray", "complex", "slice", "range"}


class Opaque:
    """Stand-in for a class this reader does not build: keeps its arguments and state, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state):
        self.state = state


def _opaque_class(module: str, name: str) -> type:
    return type(name, (Opaque,), {"__module__": f"opaque.{module}"})


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(STORAGE_DTYPES[name])


def _rebuild_tensor(storage, offset, size, stride, *unused):
    """torch._utils._rebuild_tensor_v2: a strided view of a flat storage, copied out (deferred for
    legacy-format storages, whose bytes follow the object pickle)."""
    if isinstance(storage, _LazyStorage):
        return _LazyTensor(storage, (offset, size, stride))
    itemsize = storage.dtype.itemsize
    if not size:
        return storage[offset:offset + 1].reshape(()).copy()
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                           strides=tuple(s * itemsize for s in stride))
    return np.array(view)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *unused):
    return data


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, load_storage):
        super().__init__(file)
        self._load_storage = load_storage

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module in ("builtins", "__builtin__") and name in SAFE_BUILTINS:
            return getattr(__import__("builtins"), name)
        if module.startswith("torch") and "rebuild" in name:
            raise ValueError(f"unsupported tensor kind in checkpoint ({module}.{name}); re-save it with "
                             "torch.save(state_dict) of plain dense tensors")
        return _opaque_class(module, name)

    def persistent_load(self, saved_id):
        kind, storage_type, key, _location, numel, *_view = saved_id
        if kind != "storage":
            raise ValueError(f"unsupported persistent record {kind!r}")
        if not isinstance(storage_type, _StorageType):
            raise ValueError(f"unsupported storage type {storage_type!r}")
        return self._load_storage(str(key), storage_type.dtype, numel)


def _load_zip(path: Path):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pkl = next(n for n in names if n.endswith("data.pkl"))
        root = pkl[: -len("data.pkl")]
        if f"{root}byteorder" in names and archive.read(f"{root}byteorder").decode().strip() != "little":
            raise ValueError(f"{path}: big-endian checkpoints are not supported")
        cache: dict = {}

        def storage(key, dtype, numel):
            if key not in cache:
                cache[key] = np.frombuffer(archive.read(f"{root}data/{key}"), dtype=dtype)
            return cache[key]

        return _Unpickler(io.BytesIO(archive.read(pkl)), storage).load()


def _load_legacy(path: Path):
    with open(path, "rb") as f:
        plain = _Unpickler(f, None)  # the header pickles hold no classes
        try:
            magic = plain.load()
        except (pickle.UnpicklingError, EOFError, ValueError) as error:
            magic = error
        if magic != LEGACY_MAGIC:
            raise ValueError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor the legacy format)")
        plain.load()  # protocol version
        plain.load()  # system info (little-endian etc.)
        pending: dict[str, np.dtype] = {}

        def storage(key, dtype, numel):
            pending[key] = dtype
            return _LazyStorage(key)

        obj = _Unpickler(f, storage).load()
        keys = _Unpickler(f, None).load()
        data = {}
        for key in keys:
            (numel,) = struct.unpack("<q", f.read(8))
            dtype = np.dtype(pending[key])
            data[key] = np.frombuffer(f.read(numel * dtype.itemsize), dtype=dtype)
    return _resolve(obj, data)


class _LazyStorage:
    """A legacy-format storage whose bytes come after the object pickle."""

    def __init__(self, key):
        self.key = key


class _LazyTensor:
    def __init__(self, storage, args):
        self.storage, self.args = storage, args


def _resolve(obj, data):
    """Replace lazy tensors by arrays once the legacy storages have been read."""
    if isinstance(obj, _LazyTensor):
        return _rebuild_tensor(data[obj.storage.key], *obj.args)
    if isinstance(obj, dict):
        return type(obj)((k, _resolve(v, data)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v, data) for v in obj)
    return obj


def load(path):
    """The object saved in a ``.pth`` file, with tensors as numpy arrays."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    return _load_legacy(path)
