"""sdjax.formats: safetensors and PyTorch zip checkpoints read without running pickled code.

torch is used here only to write reference files (`torch.save`) and to check what it reads back; sdjax never
imports it. The hostile corpus is built in the test: each payload would create MARKER if any code ran."""
import collections
import io
import json
import os
import pickle
import subprocess
import sys
import types
import zipfile

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from sdjax import formats, loading
from sdjax.formats import CheckpointFormatError, UnsafeCheckpointError

EXTENSIONS = [".ckpt", ".pt", ".bin", ".safetensors"]

NUMPY_OF = {
    torch.float16: np.float16, torch.bfloat16: ml_dtypes.bfloat16, torch.float32: np.float32,
    torch.float64: np.float64, torch.int8: np.int8, torch.int16: np.int16, torch.int32: np.int32,
    torch.int64: np.int64, torch.uint8: np.uint8, torch.bool: np.bool_, torch.uint16: np.uint16,
    torch.uint32: np.uint32, torch.uint64: np.uint64, torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn,
    torch.float8_e5m2: ml_dtypes.float8_e5m2,
}


def random_tensor(dtype, shape=(3, 5), seed=0):
    """Random bit patterns (NaNs and all) of `dtype`; 0/1 for bool."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    n = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape)


def raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same(ours: np.ndarray, t: torch.Tensor):
    """Bitwise equality of a numpy array read by sdjax and a torch tensor."""
    assert ours.shape == tuple(t.shape)
    assert ours.dtype == np.dtype(NUMPY_OF[t.dtype])
    assert np.ascontiguousarray(ours).tobytes() == raw_bytes(t)


def rewrite_zip(src, dst, replace=None, compression=zipfile.ZIP_STORED):
    """Copy a zip, replacing records by suffix (`{suffix: bytes or function of the old bytes}`)."""
    replace = replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            for suffix, new in replace.items():
                if info.filename.endswith(suffix):
                    data = new(data) if callable(new) else new
            zout.writestr(info.filename, data)


def refused(path, error=CheckpointFormatError, match=None, reader=None):
    """Read `path`, expect `error`, check its message is one line naming the file; return the message."""
    with pytest.raises(error) as info:
        (reader or formats.read_state_dict)(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    if match:
        assert match in message, message
    return message


# ----------------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("ext", EXTENSIONS)
def test_torch_save_round_trip_every_dtype(tmp_path, ext):
    tensors = {f"layer.{i}.{str(dt)[6:]}": random_tensor(dt, seed=i) for i, dt in enumerate(NUMPY_OF)}
    big = torch.arange(20, dtype=torch.float32)
    tensors.update({
        "scalar": torch.tensor(2.5, dtype=torch.float64), "empty": torch.empty(0, 3, dtype=torch.float16),
        "param": torch.nn.Parameter(torch.randn(4, 2)), "big": big, "slice": big[2:5],
        "transposed": big.view(4, 5).t(), "strided": big[1::3], "row": big.view(4, 5)[2],
    })
    path = tmp_path / f"model{ext}"  # the bytes decide, not the name
    torch.save(tensors, path)
    assert formats.detect_format(path) == "torch-zip"
    sd = formats.read_state_dict(path)
    assert list(sd) == list(tensors) and sd.metadata == {}
    for k, t in tensors.items():
        assert sd.shape(k) == tuple(t.shape) and sd.dtype(k) == np.dtype(NUMPY_OF[t.dtype])
        assert_same(sd[k], t.detach())
        assert not sd[k].flags.writeable
    assert np.shares_memory(sd["big"], sd["slice"])  # one storage record, two views of the file map


def test_v3_tensors_and_other_pickled_values_in_the_tree(tmp_path):
    tree = {"u16": random_tensor(torch.uint16), "f8": random_tensor(torch.float8_e5m2), "size": torch.Size([2, 3]),
            "device": torch.device("cuda", 1), "dtype": torch.bfloat16, "bytes": b"\x00\xff", "n": None,
            "t": (1, 2.5, "x"), "np": np.float32(1.5), "flag": np.bool_(True)}
    path = tmp_path / "misc.pt"
    torch.save(tree, path)
    got = formats.read_pickle_tree(path)
    assert_same(np.asarray(got["u16"]), tree["u16"])
    assert_same(got["f8"].numpy(), tree["f8"])
    assert got["size"] == (2, 3) and got["device"] == "cuda:1" and repr(got["dtype"]) == "torch.bfloat16"
    assert got["bytes"] == b"\x00\xff" and got["n"] is None and got["t"] == (1, 2.5, "x")
    assert got["np"] == np.float32(1.5) and got["np"].dtype == np.float32 and got["flag"] == np.True_
    assert sorted(formats.read_state_dict(path)) == ["f8", "u16"]


def _fake_module(monkeypatch, qualname: str, **attrs):
    """Insert `qualname` (and its parent packages) into sys.modules, holding `attrs`: pickle finds classes there."""
    parts = qualname.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name) or types.ModuleType(name))
    module = sys.modules[qualname]
    for key, value in attrs.items():
        value.__module__ = qualname
        value.__qualname__ = key
        monkeypatch.setattr(module, key, value, raising=False)
    return module


@pytest.mark.parametrize("package", ["pytorch_lightning", "lightning.pytorch"])
def test_lightning_checkpoint(tmp_path, monkeypatch, package):
    class ModelCheckpoint:  # the name and module Lightning's callback has; nothing of it runs on reading
        def __init__(self, monitor):
            self.monitor, self.best_model_score = monitor, torch.tensor(0.25)

    class AttributeDict(dict):
        pass

    _fake_module(monkeypatch, f"{package}.callbacks.model_checkpoint", ModelCheckpoint=ModelCheckpoint)
    _fake_module(monkeypatch, "pytorch_lightning.utilities.parsing", AttributeDict=AttributeDict)
    state = collections.OrderedDict(
        (k, random_tensor(torch.float16, (4, 3), seed=i)) for i, k in enumerate(
            ["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.conv_in.bias",
             "cond_stage_model.transformer.text_model.embeddings.position_ids"]))
    ckpt = {
        "epoch": 6, "global_step": 470000, "pytorch-lightning_version": "1.4.2", "state_dict": state,
        # Lightning < 1.5 keyed callback states by the callback class itself
        "callbacks": {ModelCheckpoint: {"monitor": None, "best_model_score": None, "current_score": np.float64(0.5),
                                        "best_k_models": {"a.ckpt": torch.tensor(0.3)}}},
        "instance": ModelCheckpoint("val/loss"),
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(4, 3)}}, "param_groups": [{"lr": 1e-4}]}],
        "hyper_parameters": AttributeDict(lr=1e-4, name="sd"),
    }
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)

    sd = formats.read_state_dict(path)
    assert list(sd) == list(state)  # the state_dict only, names kept
    for k, t in state.items():
        assert_same(sd[k], t)

    tree = formats.read_pickle_tree(path)
    assert tree["epoch"] == 6 and tree["global_step"] == 470000 and tree["pytorch-lightning_version"] == "1.4.2"
    (cls, cb_state), = tree["callbacks"].items()
    assert issubclass(cls, formats.InertObject)
    assert cls.qualname == f"{package}.callbacks.model_checkpoint.ModelCheckpoint"
    assert cb_state["current_score"] == 0.5 and type(cb_state["current_score"]) is np.float64
    assert_same(cb_state["best_k_models"]["a.ckpt"].numpy(), torch.tensor(0.3))
    instance = tree["instance"]
    assert isinstance(instance, cls) and instance.state["monitor"] == "val/loss"
    assert_same(instance.state["best_model_score"].numpy(), torch.tensor(0.25))
    assert isinstance(tree["hyper_parameters"], formats.InertDict) and tree["hyper_parameters"]["lr"] == 1e-4
    assert_same(tree["optimizer_states"][0]["state"][0]["exp_avg"].numpy(), torch.zeros(4, 3))


def test_textual_inversion_embedding(tmp_path):
    vector = torch.randn(2, 768)
    path = tmp_path / "style.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(vector)},
                "name": "style", "step": 3000, "sd_checkpoint": "7460a6fa", "sd_checkpoint_name": None}, path)
    sd = formats.read_state_dict(path)
    assert list(sd) == ["string_to_param.*"]
    assert_same(sd["string_to_param.*"], vector)
    tree = formats.read_pickle_tree(path)
    assert tree["name"] == "style" and tree["step"] == 3000 and tree["string_to_token"] == {"*": 265}


SAFETENSORS_TORCH = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16,
                     torch.int32, torch.int64, torch.uint8, torch.bool, torch.uint16, torch.uint32, torch.uint64,
                     torch.float8_e4m3fn, torch.float8_e5m2]


@pytest.mark.parametrize("ext", [".safetensors", ".ckpt"])
def test_safetensors_round_trip(tmp_path, ext):
    tensors = {f"t.{str(dt)[6:]}": random_tensor(dt, seed=i) for i, dt in enumerate(SAFETENSORS_TORCH)}
    tensors["empty"] = torch.empty(0, 4)
    tensors["scalar"] = torch.tensor(7, dtype=torch.int32)
    path = tmp_path / f"w{ext}"
    safetensors.torch.save_file(tensors, str(path), metadata={"format": "pt", "note": "x"})
    assert formats.detect_format(path) == "safetensors"
    sd = formats.read_state_dict(path)
    assert sorted(sd) == sorted(tensors) and sd.metadata == {"format": "pt", "note": "x"}
    for k, t in tensors.items():
        assert sd.shape(k) == tuple(t.shape)
        assert_same(sd[k], t)
    refs = formats.read_pickle_tree(path)
    assert sorted(refs) == sorted(tensors) and all(isinstance(r, formats.TensorRef) for r in refs.values())

    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.array([True, False])}
    safetensors.numpy.save_file(arrays, str(path))
    sd = formats.read_state_dict(path)
    for k, a in arrays.items():
        np.testing.assert_array_equal(sd[k], a)
        assert sd[k].dtype == a.dtype


def test_big_endian_byteorder(tmp_path):
    tensors = {"f32": random_tensor(torch.float32), "f16": random_tensor(torch.float16, seed=1),
               "bf16": random_tensor(torch.bfloat16, seed=2), "i64": random_tensor(torch.int64, seed=3),
               "i16": random_tensor(torch.int16, seed=4), "b": random_tensor(torch.bool, seed=5),
               "f64": random_tensor(torch.float64, (6, 4), seed=6)}
    tensors["f64_view"] = tensors["f64"][1:5, ::2]  # shares storage 6
    src, dst = tmp_path / "little.pt", tmp_path / "big.pt"
    torch.save(tensors, src)
    itemsizes = [t.element_size() for t in tensors.values()][:7]  # storage key i belongs to tensor i

    def swap(i):
        return lambda data: np.frombuffer(data, f"u{itemsizes[i]}").byteswap().tobytes() if itemsizes[i] > 1 else data

    rewrite_zip(src, dst, {"/byteorder": b"big", **{f"/data/{i}": swap(i) for i in range(7)}})
    reloaded = torch.load(dst, weights_only=True)  # torch agrees that the crafted file says the same
    assert all(raw_bytes(reloaded[k]) == raw_bytes(t) for k, t in tensors.items())
    sd = formats.read_state_dict(dst)
    for k, t in tensors.items():
        assert_same(sd[k], t)


def test_compressed_records_are_read_too(tmp_path):
    tensors = {"a": torch.randn(5, 7), "b": torch.randn(3).half()}
    src, dst = tmp_path / "a.pt", tmp_path / "deflated.pt"
    torch.save(tensors, src)
    rewrite_zip(src, dst, compression=zipfile.ZIP_DEFLATED)
    sd = formats.read_state_dict(dst)
    for k, t in tensors.items():
        assert_same(sd[k], t)


def test_keys_and_shapes_read_no_tensor_data(tmp_path, monkeypatch):
    tensors = {f"w{i}": torch.full((256, 128), float(i)) for i in range(8)}
    path = tmp_path / "lazy.pt"
    torch.save(tensors, path)
    st_path = tmp_path / "lazy.safetensors"
    safetensors.torch.save_file(tensors, str(st_path))
    calls = []
    for cls in (formats._Archive, formats.SafetensorsFile):
        def counted(self, name, _read=cls.record):
            calls.append(name)
            return _read(self, name)
        monkeypatch.setattr(cls, "record", counted)
    for p in (path, st_path):
        calls.clear()
        sd = formats.read_state_dict(p)
        assert sorted(sd) == sorted(tensors) and "w3" in sd
        assert all(sd.shape(k) == (256, 128) and sd.dtype(k) == np.float32 for k in sd)
        assert calls == []  # the header / pickle only
        w3 = sd["w3"]
        assert len(calls) == 1 and calls[0].endswith("3")
        assert not w3.flags.owndata and not w3.flags.writeable  # a view into the file's memory map
        assert (w3 == 3.0).all()


def test_sdjax_formats_never_imports_torch(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"w": torch.ones(2)}, path)
    code = (f"import sys; from sdjax import formats; sd = formats.read_state_dict({str(path)!r}); "
            "assert float(sd['w'].sum()) == 2.0; "
            "assert not [m for m in sys.modules if m == 'torch' or m.startswith('torch.')], 'torch imported'")
    root = os.path.dirname(os.path.dirname(os.path.abspath(formats.__file__)))  # this checkout's sdjax
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)


# ----------------------------------------------------------------------------------------------------------------
# Hostile pickles


def op_global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def op_stack_global(module, name):  # protocol 4
    return b"".join(b"\x8c" + bytes([len(s)]) + s.encode() for s in (module, name)) + b"\x93"


def op_str(s: str):
    data = s.encode("utf-8")
    return b"X" + len(data).to_bytes(4, "little") + data


def op_call(fn: bytes, *args: bytes):
    return fn + b"(" + b"".join(args) + b"tR"


def as_pickle(body: bytes, proto=2):
    """{"w": <body>} as a whole pickle."""
    return b"\x80" + bytes([proto]) + b"}" + op_str("w") + body + b"s."


def payloads(tmp_path):
    """name -> (pickle bytes, the global the reader must refuse); each creates MARKER when unpickled."""
    marker = tmp_path / "MARKER"
    sh = f"touch {marker}"
    py = f"open({str(marker)!r}, 'w').close()"
    (tmp_path / "evil_script.py").write_text(py + "\n")
    (tmp_path / "sdjax_evil_module.py").write_text(py + "\n")
    inner = as_pickle(op_call(op_global("os", "system"), op_str(sh)))
    latin1 = op_call(op_global("_codecs", "encode"), op_str(inner.decode("latin1")), op_str("latin1"))
    return {
        "os.system": (as_pickle(op_call(op_global("os", "system"), op_str(sh))), "os.system"),
        "posix.system": (as_pickle(op_call(op_global("posix", "system"), op_str(sh))), "posix.system"),
        "nt.system": (as_pickle(op_call(op_global("nt", "system"), op_str(sh))), "nt.system"),
        "builtins.eval": (as_pickle(op_call(op_global("builtins", "eval"), op_str(py))), "builtins.eval"),
        "builtins.exec": (as_pickle(op_call(op_global("builtins", "exec"), op_str(py))), "builtins.exec"),
        "__builtin__.eval": (as_pickle(op_call(op_global("__builtin__", "eval"), op_str(py))), "__builtin__.eval"),
        "builtins.getattr": (as_pickle(op_call(op_call(
            op_global("builtins", "getattr"), op_call(op_global("builtins", "__import__"), op_str("os")),
            op_str("system")), op_str(sh))), "builtins.getattr"),
        "subprocess.Popen": (as_pickle(op_call(op_global("subprocess", "Popen"),
                                               b"(" + op_str("touch") + op_str(str(marker)) + b"t")),
                             "subprocess.Popen"),
        "subprocess.check_call": (as_pickle(op_call(op_global("subprocess", "check_call"),
                                                    b"(" + op_str("touch") + op_str(str(marker)) + b"t")),
                                  "subprocess.check_call"),
        "functools.partial": (as_pickle(op_call(op_call(op_global("functools", "partial"),
                                                        op_global("os", "system"), op_str(sh)))),
                              "functools.partial"),
        "pickle.loads": (as_pickle(op_call(op_global("pickle", "loads"), latin1)), "pickle.loads"),
        "_pickle.loads": (as_pickle(op_call(op_global("_pickle", "loads"), latin1)), "_pickle.loads"),
        "runpy.run_path": (as_pickle(op_call(op_global("runpy", "run_path"),
                                             op_str(str(tmp_path / "evil_script.py")))), "runpy.run_path"),
        "importlib.import_module": (as_pickle(op_call(op_global("importlib", "import_module"),
                                                      op_str("sdjax_evil_module"))), "importlib.import_module"),
        "STACK_GLOBAL os.system": (as_pickle(op_call(op_stack_global("os", "system"), op_str(sh)), proto=4),
                                   "os.system"),
        "INST os.system": (as_pickle(b"(" + op_str(sh) + b"ios\nsystem\n"), "os.system"),
        "OBJ os.system": (as_pickle(b"(" + op_global("os", "system") + op_str(sh) + b"o"), "os.system"),
        "reduce protocol 2": (pickle.dumps({"w": _Evil(sh)}, protocol=2), "posix.system"),
        "reduce protocol 5": (pickle.dumps({"w": _Evil(sh)}, protocol=5), "posix.system"),
    }


class _Evil:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os
        return os.system, (self.command,)


PAYLOADS = ["os.system", "posix.system", "nt.system", "builtins.eval", "builtins.exec", "__builtin__.eval",
            "builtins.getattr", "subprocess.Popen", "subprocess.check_call", "functools.partial", "pickle.loads",
            "_pickle.loads", "runpy.run_path", "importlib.import_module", "STACK_GLOBAL os.system", "INST os.system",
            "OBJ os.system", "reduce protocol 2", "reduce protocol 5"]


@pytest.fixture
def evil(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))  # where importlib.import_module would find the evil module
    monkeypatch.chdir(tmp_path)
    yield payloads(tmp_path)
    assert not (tmp_path / "MARKER").exists(), "a payload ran"


@pytest.mark.parametrize("name", [p for p in PAYLOADS if p != "nt.system"])
def test_the_payloads_are_live(tmp_path, monkeypatch, name):
    """Plain pickle.loads runs each payload: the corpus would catch a reader that executes anything."""
    monkeypatch.syspath_prepend(str(tmp_path))
    data, _ = payloads(tmp_path)[name]
    try:
        result = pickle.loads(data)["w"]
    finally:
        sys.modules.pop("sdjax_evil_module", None)
    if isinstance(result, subprocess.Popen):
        result.wait()
    assert (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("ext", EXTENSIONS)
@pytest.mark.parametrize("name", PAYLOADS)
def test_raw_pickles_are_refused(tmp_path, evil, name, ext):
    data, _ = evil[name]
    path = tmp_path / f"model{ext}"
    path.write_bytes(data)
    message = refused(path, UnsafeCheckpointError, "pickle")
    assert "refused" in message
    refused(path, UnsafeCheckpointError, "pickle", reader=formats.read_pickle_tree)
    refused(path, UnsafeCheckpointError, "pickle", reader=lambda p: loading.read_checkpoint([p]))


@pytest.fixture
def torch_zip(tmp_path):
    path = tmp_path / "base.pt"
    torch.save({"w": torch.ones(2)}, path)
    return path


@pytest.mark.parametrize("ext", EXTENSIONS)
@pytest.mark.parametrize("name", PAYLOADS)
def test_hostile_data_pkl_in_a_torch_zip_is_refused(tmp_path, evil, torch_zip, name, ext):
    data, global_name = evil[name]
    path = tmp_path / f"model{ext}"
    rewrite_zip(torch_zip, path, {"/data.pkl": data})
    assert formats.detect_format(path) == "torch-zip"
    refused(path, UnsafeCheckpointError, f"refused global {global_name} ")
    refused(path, UnsafeCheckpointError, f"refused global {global_name} ", reader=formats.read_pickle_tree)


def test_legacy_torch_format_is_refused(tmp_path):
    for ext in EXTENSIONS:
        path = tmp_path / f"old{ext}"
        torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
        refused(path, UnsafeCheckpointError, "legacy (pre-1.6)")
        refused(path, UnsafeCheckpointError, "legacy (pre-1.6)", reader=lambda p: loading.read_checkpoint([p]))


def test_other_files_are_refused(tmp_path, torch_zip):
    cases = {
        "empty.ckpt": b"",
        "short.bin": b"\x01\x02\x03",
        "text.pt": b"this is not a checkpoint at all, just some text",
        "protocol0.pt": pickle.dumps({"a": 1}, protocol=0),
        "halfzip.pt": torch_zip.read_bytes()[: len(torch_zip.read_bytes()) // 2],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    refused(tmp_path / "empty.ckpt", CheckpointFormatError, "empty file")
    refused(tmp_path / "short.bin", CheckpointFormatError, "truncated")
    refused(tmp_path / "text.pt", CheckpointFormatError, "not a safetensors file or PyTorch zip")
    refused(tmp_path / "protocol0.pt", UnsafeCheckpointError, "pickle (protocol 0/1)")
    refused(tmp_path / "halfzip.pt", CheckpointFormatError, "damaged zip")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("readme.txt", "hello")
    refused(tmp_path / "other.zip", CheckpointFormatError, "not a PyTorch checkpoint")
    rewrite_zip(torch_zip, tmp_path / "order.pt", {"/byteorder": b"middle"})
    refused(tmp_path / "order.pt", CheckpointFormatError, "byteorder")
    refused(torch_zip, CheckpointFormatError, "not a safetensors file", reader=lambda p: loading.read_checkpoint([p]))


def test_a_damaged_record_is_refused_when_read(tmp_path, torch_zip):
    with zipfile.ZipFile(torch_zip) as z:
        at = next(i for i in z.infolist() if i.filename.endswith("/data/0")).header_offset
    data = bytearray(torch_zip.read_bytes())
    data[at:at + 4] = b"XXXX"  # the record's local header
    path = tmp_path / "damaged.pt"
    path.write_bytes(bytes(data))
    sd = formats.read_state_dict(path)  # only the directory and data.pkl are read here
    assert sd.shape("w") == (2,)
    refused(path, CheckpointFormatError, "no local file header", reader=lambda p: sd["w"])


# ----------------------------------------------------------------------------------------------------------------
# Crafted torch zips: storages and views that lie


class FakeStorage:
    def __init__(self, key, storage_type=torch.FloatStorage, numel=4, location="cpu"):
        self.key, self.storage_type, self.numel, self.location = key, storage_type, numel, location


class FakeTensor:
    def __init__(self, storage, offset=0, size=(4,), stride=(1,), rebuild=torch._utils._rebuild_tensor_v2):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())
        self.rebuild = rebuild

    def __reduce__(self):
        return self.rebuild, self.args


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, FakeStorage):
            return ("storage", obj.storage_type, obj.key, obj.location, obj.numel)
        return None


def crafted_zip(path, obj, records, byteorder=b"little", raw_pickle=None):
    """A torch-style zip: data.pkl pickled from `obj` (FakeTensor/FakeStorage inside) or given, and records."""
    if raw_pickle is None:
        buf = io.BytesIO()
        TorchPickler(buf, protocol=2).dump(obj)
        raw_pickle = buf.getvalue()
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", raw_pickle)
        z.writestr("archive/byteorder", byteorder)
        for key, data in records.items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")
    return path


FOUR = np.arange(4, dtype=np.float32).tobytes()


@pytest.mark.parametrize("tensor, match", [
    (FakeTensor(FakeStorage("0", numel=100)), "need 400 bytes, record data/0 holds 16"),
    (FakeTensor(FakeStorage("0"), offset=2, size=(3,)), "reaches element 4 of a storage of 4"),
    (FakeTensor(FakeStorage("0"), size=(2, 2), stride=(3, 1)), "reaches element 4"),
    (FakeTensor(FakeStorage("0"), offset=5, size=(0,)), "reaches element"),
    (FakeTensor(FakeStorage("0"), offset=-1, size=(2,)), "storage offset -1"),
    (FakeTensor(FakeStorage("0"), offset=1.0, size=(2,)), "storage offset 1.0"),
    (FakeTensor(FakeStorage("0"), size=(2,), stride=(-1,)), "stride (-1,)"),
    (FakeTensor(FakeStorage("0"), size=(2, -2), stride=(1, 1)), "size (2, -2)"),
    (FakeTensor(FakeStorage("0"), size=(2, 2), stride=(1,)), "differ in rank"),
    (FakeTensor(FakeStorage("7")), "which the archive lacks"),
    (FakeTensor(FakeStorage("0", numel=-1)), "malformed persistent id"),
    (FakeTensor("not a storage"), "is not a storage"),
    ([FakeTensor(FakeStorage("0")), FakeTensor(FakeStorage("0", torch.HalfStorage, numel=8))], "declared twice"),
])
def test_lying_storages_and_views_are_refused(tmp_path, tensor, match):
    path = crafted_zip(tmp_path / "lies.pt", {"w": tensor}, {"0": FOUR})
    refused(path, CheckpointFormatError, match)


def test_crafted_strided_views_read_correctly(tmp_path):
    storage = FakeStorage("0", numel=4)
    path = crafted_zip(tmp_path / "views.pt", {
        "t": FakeTensor(storage, size=(2, 2), stride=(1, 2)),
        "expanded": FakeTensor(storage, offset=3, size=(3,), stride=(0,)),
        "last": FakeTensor(storage, offset=3, size=(1,), stride=(1,)),
        "empty_at_end": FakeTensor(storage, offset=4, size=(0,), stride=(1,)),
    }, {"0": FOUR})
    sd = formats.read_state_dict(path)
    np.testing.assert_array_equal(sd["t"], [[0, 2], [1, 3]])
    np.testing.assert_array_equal(sd["expanded"], [3, 3, 3])
    np.testing.assert_array_equal(sd["last"], [3])
    assert sd["empty_at_end"].shape == (0,)


def test_v3_needs_its_dtype(tmp_path):
    tensor = FakeTensor(FakeStorage("0", torch.UntypedStorage, numel=16), size=(8,), stride=(1,),
                        rebuild=torch._utils._rebuild_tensor_v3)
    tensor.args = (*tensor.args, torch.float16)
    sd = formats.read_state_dict(crafted_zip(tmp_path / "v3.pt", {"h": tensor}, {"0": FOUR}))
    assert_same(sd["h"], torch.frombuffer(bytearray(FOUR), dtype=torch.float16))


def _build_after(prefix_pickle: bytes, state: bytes) -> bytes:
    """`prefix_pickle` (without STOP) followed by BUILD with `state` on its result."""
    return prefix_pickle.rstrip(b".") + state + b"b."


@pytest.mark.parametrize("name", ["tensor", "allowed function", "OrderedDict class", "stand-in class"])
def test_build_cannot_rewrite_our_objects(tmp_path, name):
    buf = io.BytesIO()
    TorchPickler(buf, protocol=2).dump(FakeTensor(FakeStorage("0"), size=(4,)))
    targets = {
        "tensor": buf.getvalue(),
        "allowed function": b"\x80\x02" + op_global("torch._utils", "_rebuild_tensor_v2") + b".",
        "OrderedDict class": b"\x80\x02" + op_global("collections", "OrderedDict") + b".",
        "stand-in class": b"\x80\x02" + op_global("pytorch_lightning.callbacks.model_checkpoint",
                                                  "ModelCheckpoint") + b".",
    }
    # (None, {"offset": 10**6, ...}): slot state that would be set with setattr without a __setstate__
    state = b"N}" + op_str("offset") + b"J" + (10 ** 6).to_bytes(4, "little") + b"s\x86"
    path = crafted_zip(tmp_path / "build.pt", None, {"0": FOUR}, raw_pickle=_build_after(targets[name], state))
    refused(path, CheckpointFormatError, reader=formats.read_pickle_tree)
    assert not hasattr(collections.OrderedDict, "offset")
    cls = formats.ALLOWED_GLOBALS[("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")]()
    assert not hasattr(cls, "offset")
    good = crafted_zip(tmp_path / "good.pt", {"w": FakeTensor(FakeStorage("0"))}, {"0": FOUR})
    np.testing.assert_array_equal(formats.read_state_dict(good)["w"], np.arange(4))


def test_attributes_set_on_an_ordered_dict_do_not_hide_tensors(tmp_path):
    buf = io.BytesIO()
    TorchPickler(buf, protocol=2).dump(collections.OrderedDict(w=FakeTensor(FakeStorage("0"))))
    # BUILD (None, {"items": OrderedDict, "get": OrderedDict}) on the state dict: instance attributes shadow methods
    state = b"N}(" + op_str("items") + op_global("collections", "OrderedDict") + op_str("get") + \
        op_global("collections", "OrderedDict") + b"u\x86"
    path = crafted_zip(tmp_path / "attrs.pt", None, {"0": FOUR}, raw_pickle=_build_after(buf.getvalue(), state))
    tree = formats.read_pickle_tree(path)
    assert tree.items is collections.OrderedDict  # the pickle did set it ...
    np.testing.assert_array_equal(formats.read_state_dict(path)["w"], np.arange(4))  # ... and it changes nothing


@pytest.mark.parametrize("body, error, match", [
    (op_call(op_global("_codecs", "encode"), op_str("eJw="), op_str("base64")), UnsafeCheckpointError,
     "_codecs.encode with encoding 'base64'"),
    (op_call(op_global("numpy", "dtype"), op_str("O"), b"\x89", b"\x88"), UnsafeCheckpointError, "numpy.dtype('O')"),
    (op_call(op_global("numpy.core.multiarray", "scalar"), op_str("x"), op_str("y")), CheckpointFormatError,
     "numpy scalar"),
    (op_call(op_global("torch", "Size"), op_str("abc")), CheckpointFormatError, "torch.Size"),
    (op_global("torch", "load"), UnsafeCheckpointError, "refused global torch.load"),
    (op_global("numpy.core.multiarray", "_reconstruct"), UnsafeCheckpointError, "refused global numpy.core"),
    (op_global("__main__", "ModelCheckpoint"), UnsafeCheckpointError, "refused global __main__.ModelCheckpoint"),
    (b"\x82\x01", CheckpointFormatError, "extension"),  # EXT1: copyreg's registry is empty
    (b"P0\n", UnsafeCheckpointError, "persistent id '0'"),  # a protocol-0 persistent id
    (b"\xff", CheckpointFormatError, "not a valid checkpoint pickle"),
])
def test_misused_allowed_globals_and_odd_opcodes(tmp_path, body, error, match):
    path = crafted_zip(tmp_path / "odd.pt", None, {}, raw_pickle=as_pickle(body))
    refused(path, error, match, reader=formats.read_pickle_tree)


def test_cycles_and_shared_containers_do_not_hang(tmp_path, monkeypatch):
    path = crafted_zip(tmp_path / "cycle.pt", None, {}, raw_pickle=b"\x80\x02]q\x00h\x00a.")  # L = [L]
    refused(path, CheckpointFormatError, "nested deeper")
    # T0 = ("x",); Ti = (T(i-1), T(i-1)): 2**30 paths through 31 tuples
    ops = [b"\x80\x02", op_str("x"), b"\x85q\x00"]
    for i in range(1, 31):
        ops.append(b"h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"\x86q" + bytes([i]))
    ops.append(b".")
    monkeypatch.setattr(formats, "MAX_TREE_NODES", 10_000)
    path = crafted_zip(tmp_path / "dag.pt", None, {}, raw_pickle=b"".join(ops))
    refused(path, CheckpointFormatError, "more than 10000 objects")


# ----------------------------------------------------------------------------------------------------------------
# Safetensors headers that lie


def st_file(header, data=b"", raw_header=None):
    text = raw_header if raw_header is not None else json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


D16 = bytes(range(16))


def F32(shape, offsets):
    return {"dtype": "F32", "shape": shape, "data_offsets": offsets}


LYING_HEADERS = {
    "header longer than the file": (100).to_bytes(8, "little") + b"{}",
    "huge header length": (1 << 40).to_bytes(8, "little") + b"{}" + bytes(100),
    "header over 100 MB": None,  # written sparse by the test
    "zero header length": (0).to_bytes(8, "little") + bytes(8),
    "not JSON": st_file(None, raw_header=b"{not json}"),
    "JSON list": st_file([]),
    "JSON string": st_file("abc"),
    "not UTF-8": st_file(None, raw_header=b'{"\xff\xfe": 1}'),
    "NaN": st_file(None, D16, raw_header=b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16], "x": NaN}}'),
    "unknown dtype": st_file({"a": {"dtype": "Q7", "shape": [4], "data_offsets": [0, 16]}}, D16),
    "complex dtype": st_file({"a": {"dtype": "C64", "shape": [2], "data_offsets": [0, 16]}}, D16),
    "offsets past the data": st_file({"a": F32([8], [0, 32])}, D16),
    "overlapping offsets": st_file({"a": F32([2], [0, 8]), "b": F32([3], [4, 16])}, D16),
    "the same offsets twice": st_file({"a": F32([4], [0, 16]), "b": F32([4], [0, 16])}, D16),
    "a gap": st_file({"a": F32([1], [0, 4]), "b": F32([2], [8, 16])}, D16),
    "a gap at the start": st_file({"a": F32([2], [8, 16])}, D16),
    "trailing data": st_file({"a": F32([2], [0, 8])}, D16),
    "fractional offsets": st_file({"a": F32([4], [0, 15.5])}, D16),
    "float offsets": st_file({"a": F32([4], [0.0, 16.0])}, D16),
    "bool offsets": st_file({"a": {"dtype": "U8", "shape": [1], "data_offsets": [False, True]}}, D16[:1]),
    "negative offset": st_file({"a": F32([4], [-1, 15])}, D16),
    "end before begin": st_file({"a": F32([0], [16, 0])}, D16),
    "three offsets": st_file({"a": F32([4], [0, 16, 16])}, D16),
    "no offsets": st_file({"a": {"dtype": "F32", "shape": [4]}}, D16),
    "negative shape": st_file({"a": F32([-4], [0, 16])}, D16),
    "fractional shape": st_file({"a": F32([4.0], [0, 16])}, D16),
    "shape × itemsize ≠ length": st_file({"a": F32([3], [0, 16])}, D16),
    "entry not an object": st_file({"a": 5}),
    "metadata values not strings": st_file({"__metadata__": {"a": 1}, "a": F32([4], [0, 16])}, D16),
    "metadata a list": st_file({"__metadata__": ["a"], "a": F32([4], [0, 16])}, D16),
    "duplicate names": st_file(None, D16 + D16, raw_header=b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": '
                               b'[0, 16]}, "a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}'),
    "truncated data": st_file({"a": F32([4], [0, 16])}, D16[:10]),
}
LIBRARY_ACCEPTS = {"duplicate names", "complex dtype"}  # sdjax is stricter there: no model has complex weights


@pytest.mark.parametrize("case", list(LYING_HEADERS))
def test_lying_safetensors_headers_are_refused(tmp_path, case):
    path = tmp_path / "model.safetensors"
    if LYING_HEADERS[case] is None:
        with open(path, "wb") as f:
            f.write((100_000_001).to_bytes(8, "little") + b"{")
            f.truncate(8 + 100_000_001)
    else:
        path.write_bytes(LYING_HEADERS[case])
    refused(path, CheckpointFormatError)
    refused(path, CheckpointFormatError, "cannot read safetensors checkpoint",
            reader=lambda p: loading.read_checkpoint([p]))
    if case not in LIBRARY_ACCEPTS:
        with pytest.raises(Exception):
            safetensors.numpy.load_file(str(path))


ACCEPTED = {
    "no tensors": st_file({}),
    "null metadata": st_file({"__metadata__": None, "a": F32([4], [0, 16])}, D16),
    "extra fields": st_file({"a": {**F32([4], [0, 16]), "extra": [1, 2]}}, D16),
    "padded header": st_file(None, D16, raw_header=json.dumps({"a": F32([4], [0, 16])}).encode() + b"     "),
    "empty tensors anywhere": st_file({"e1": F32([0], [0, 0]), "a": F32([4], [0, 16]), "e2": F32([0, 3], [16, 16])},
                                      D16),
    "reversed order": st_file({"b": F32([2], [8, 16]), "a": F32([2], [0, 8])}, D16),
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_safetensors_the_library_accepts_are_read(tmp_path, case):
    path = tmp_path / "ok.safetensors"
    path.write_bytes(ACCEPTED[case])
    expect = safetensors.numpy.load_file(str(path))
    sd = formats.read_state_dict(path)
    assert sorted(sd) == sorted(expect)
    for k, v in expect.items():
        np.testing.assert_array_equal(sd[k], v)
        assert sd[k].dtype == v.dtype
    assert sorted(loading.read_checkpoint([path])) == sorted(expect)
