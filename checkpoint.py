"""Checkpoints, at the bottom of the house: every model file loads and saves through here.

Reading      safetensors files, one or sharded by a NAME.index.json (each tensor with the file it came from, so an
             error names it), or lazily as FileSlices that read only the rows asked for.
load_strict  fills a model built on the meta device: every parameter present with its shape, nothing unexpected,
             errors naming the key and the file. On the meta device nothing is read: each parameter keeps its
             `.source` (a FileSlice or a tensor) for distributed.parallelize to fill after sharding, so rank-sharded
             loading passes the same checks as any other load.
typed_fields config.json values checked against a config dataclass's field types where they enter.
Training     states for resume (DCP: each rank writes its own shards, any number of ranks reads them; the pickled
             .metadata index is read by a reader that builds only DCP's metadata classes), the newest state, metrics
             trimmed to it, and fresh temporary folders that become the output only once complete.
"""
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import typing
from contextlib import contextmanager, nullcontext
from dataclasses import MISSING, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor

from fileio import fresh_dir, read_json, read_jsonl, write_json, write_text


# The config.json fields that size a model, bounded far past any released model: a typo ("num_hidden_layers":
# 100000000) is an error naming it, not minutes spent building a module tree before any tensor is read.
SIZE_LIMITS = {"num_hidden_layers": 1024, "num_attention_heads": 1024, "num_key_value_heads": 1024,
               "hidden_size": 2**16, "intermediate_size": 2**18, "vocab_size": 2**22, "head_dim": 2**12,
               "max_position_embeddings": 2**22, "image_size": 2**14, "patch_size": 2**10, "num_channels": 16}


def typed_fields(cls, values: dict, source) -> dict:
    """`values` checked against the dataclass `cls`'s field types: JSON holds "64" or 4.0 as easily as 64, and
    either would fail deep inside the model. ints stay ints (4.0 is refused), an int is a fine float, sizes stay
    within SIZE_LIMITS; a missing field without a default is named, with `source` (the file)."""
    out = {}
    for f in fields(cls):
        if f.name not in values:
            if f.default is MISSING:
                raise ValueError(f"{source}: missing {f.name!r}")
            continue
        value, kinds = values[f.name], typing.get_args(f.type) or (f.type,)  # `int | None` -> (int, NoneType)
        if type(value) not in kinds and not (float in kinds and type(value) is int):
            names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise ValueError(f"{source}: {f.name} is {value!r}, expected {names}")
        if f.name in SIZE_LIMITS and not 0 <= value <= SIZE_LIMITS[f.name]:
            raise ValueError(f"{source}: {f.name} is {value}, not in 0..{SIZE_LIMITS[f.name]}")
        out[f.name] = float(value) if float in kinds and type(value) is int else value
    return out


# ---------------------------------------------------------------------------------------------- reading tensors

def read_index(index) -> dict:
    """A shard index (NAME.index.json) as {tensor name: shard file}; every shard must lie inside the index's folder."""
    content = read_json(index)
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: no 'weight_map' {{tensor name: shard file}}")
    folder = os.path.dirname(os.path.abspath(index))
    files = {}
    for key, shard in weight_map.items():
        # lexical check (not realpath): the HF hub cache links every file to a blob outside the folder
        file = os.path.normpath(os.path.join(folder, shard))
        if os.path.commonpath([folder, file]) != folder:
            raise ValueError(f"{index}: shard {shard!r} of {key!r} lies outside the checkpoint folder")
        files[key] = file
    return files


def read_safetensors(file, device="cpu", skip=lambda key: False) -> dict:
    try:
        with safe_open(file, framework="pt", device=str(device)) as f:  # reads only the tensors asked for
            return {k: f.get_tensor(k) for k in f.keys() if not skip(k)}
    except SafetensorError as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


class FileSlice:
    """A tensor of a safetensors file that reads only the rows it is indexed with, through a memory map opened and
    closed per read: the pages it touched leave the process with the map (one map kept open would keep every page
    read resident, and a rank's peak memory would again be the whole model)."""

    def __init__(self, file, key, view):
        self.file, self.key, self.shape, self.dtype = file, key, tuple(view.get_shape()), view.get_dtype()

    def is_floating_point(self) -> bool:
        return self.dtype.startswith(("F", "BF"))  # safetensors' names: F32, F16, BF16, F8_E4M3, ...

    def __getitem__(self, index):
        with safe_open(self.file, framework="pt", device="cpu") as f:
            return f.get_slice(self.key)[index]


def read_slices(file, device="meta", skip=lambda key: False) -> dict:
    """read_safetensors's lazy form: {key: FileSlice}, nothing read yet."""
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            return {k: FileSlice(file, k, f.get_slice(k)) for k in f.keys() if not skip(k)}
    except SafetensorError as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


def load_checkpoint(path, device="cpu", skip=lambda key: False, single="model.safetensors", read=None):
    """(tensors, {key: the file it came from}) from one file, or a folder holding `single` or its shard index
    `single`.index.json; skipped keys are never read. On the meta device safetensors are read lazily (FileSlices).
    formats.py passes single="pytorch_model.bin" and its pickle reader."""
    path = os.fspath(path)
    read = read or (read_slices if str(device) == "meta" else read_safetensors)
    index = os.path.join(path, single + ".index.json")
    if os.path.isfile(path) or os.path.isfile(os.path.join(path, single)):
        weight_map, shards = None, [path if os.path.isfile(path) else os.path.join(path, single)]
    elif os.path.isfile(index):
        weight_map = read_index(index)
        shards = sorted(set(weight_map.values()))
    else:
        raise FileNotFoundError(f"{path}: no {single} or {single}.index.json")
    tensors, files = {}, {}
    for shard in shards:
        if not os.path.isfile(shard):
            raise FileNotFoundError(f"{index} lists shard {shard}, which does not exist")
        part = read(shard, device, skip)
        for key in [k for k, s in (weight_map or {}).items() if s == shard and not skip(k) and k not in part]:
            raise KeyError(f"{shard}: key {key!r} listed in {index} is not in the shard")
        files.update(dict.fromkeys(part, shard))
        tensors.update(part)
    return tensors, files


def load_strict(model, tensors: dict, files: dict, to_model=None, to_file=None, device="cpu", dtype=torch.float32):
    """Fill a meta-device `model` from checkpoint `tensors` (file names; `files`: name -> file) renamed by `to_model`
    (its inverse `to_file` names what is missing), strictly: every parameter present with its shape and, where a
    weight is expected, a floating dtype; nothing unexpected. A tied parameter (one Parameter under two names) is
    read once, under its first name. `tensors` is emptied as it is converted: each file tensor is freed once in
    `dtype`, so there is never a second copy of the model. device="meta": nothing is converted; every parameter
    stays an empty meta tensor of `dtype` holding `.source`, the FileSlice or tensor that fills it later."""
    to_model, to_file = to_model or (lambda sd: sd), to_file or (lambda sd: sd)
    read = sorted(set(files.values()))  # named for a missing key: the one file, or the folder of the shards
    folder = read[0] if len(read) == 1 else os.path.commonpath([os.path.dirname(f) for f in read] or ["."])
    names = to_model({k: k for k in tensors})  # model key -> key in the file
    if len(names) < len(tensors):
        raise KeyError(f"{folder}: several tensors map to one key: {sorted(set(tensors) - set(names.values()))}")
    state = dict(to_model(tensors))  # a new dict even for the identity map: the caller's is emptied
    tensors.clear()
    params, first, tied = model.state_dict(keep_vars=True), {}, {}
    for key, p in params.items():
        tied[key] = first.setdefault(id(p), key)
    tied = {k: v for k, v in tied.items() if k != v}  # alias -> the name it is stored under
    for key, p in params.items():
        if key in tied:
            continue
        if key not in state:
            name = next(iter(to_file({key: 0})))
            raise KeyError(f"{folder}: missing key {name!r}{f' ({key})' if name != key else ''} "
                           f"(expected shape {tuple(p.shape)})")
        where = f"{files[names[key]]}: key {names[key]!r}"
        if tuple(state[key].shape) != tuple(p.shape):
            raise ValueError(f"{where} has shape {tuple(state[key].shape)}, expected {tuple(p.shape)}")
        if p.is_floating_point() and not state[key].is_floating_point():
            raise ValueError(f"{where} holds {state[key].dtype}, expected a floating-point weight")
    for key in state:
        if key not in params or key in tied:
            raise KeyError(f"{files[names[key]]}: unexpected key {names[key]!r}")
    lazy = str(device) == "meta"
    sources = dict(state) if lazy else {}
    for key, value in state.items():  # in place: each file tensor is freed as soon as it is converted
        floating = value.is_floating_point()
        state[key] = (torch.empty(value.shape, device="meta", dtype=dtype if floating else params[key].dtype) if lazy
                      else value.to(device=device, dtype=dtype if floating else None))
    state.update({alias: state[key] for alias, key in tied.items()})
    model.load_state_dict(state, strict=True, assign=True)
    for alias, key in tied.items():  # assign=True made two Parameters of the shared one: share it again
        module, _, name = alias.rpartition(".")
        setattr(model.get_submodule(module), name, model.get_parameter(key))
    for key, source in sources.items():
        model.get_parameter(key).source = source
    return model


def fingerprint(path, samples=16, size=4096) -> str:
    """A short hash that tells a checkpoint folder's weights from another's without reading them all: each weight
    file's name and size and `samples` evenly spaced reads of `size` bytes (any fine-tune changes bytes everywhere).
    Milliseconds for a 7B folder; the same weights copied elsewhere give the same value."""
    digest = hashlib.sha256()
    files = sorted(f for f in os.listdir(path) if f.endswith((".safetensors", ".bin"))) if os.path.isdir(path) \
        else [os.path.basename(path)]
    for name in files:
        file = os.path.join(path, name) if os.path.isdir(path) else path
        length = os.path.getsize(file)
        digest.update(f"{name}:{length}".encode())
        with open(file, "rb") as f:
            for i in range(samples):
                f.seek(max(0, length - size) * i // max(samples - 1, 1))
                digest.update(f.read(size))
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- training states
# A training state holds the trained weights, the optimizer, the step (the data position and the schedule follow
# from it), each rank's RNG and the settings a resume must share. Folders are written to a fresh temporary folder
# beside the target, then renamed: a crash, Ctrl-C or a full disk never leaves a half-written one.

# a failed write as torch (RuntimeError) and safetensors (SafetensorError) report one: ENOSPC 28, EFBIG 27
WRITE_FAILED = re.compile(r"no space left|file too large|os error 2[78]\b|code: 2[78]\b|write failed|failed writing",
                          re.IGNORECASE)


@contextmanager
def temp_dir(folder, target, nbytes, hint=""):
    """A fresh temporary folder in `folder`, always removed afterwards. A failed write inside (a full disk, a file
    too large: an OSError, or torch's and safetensors' own errors that wrap one) becomes an OSError naming the
    target, the space it needs and the space free there."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    tmp = Path(fresh_dir(folder, Path(target).name))
    try:
        yield tmp
    except (OSError, RuntimeError, SafetensorError) as e:
        if not (isinstance(e, OSError) or WRITE_FAILED.search(str(e))):
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise OSError(f"could not write {target}: {reason}; it needs about {nbytes / 2**20:,.1f} MiB, "
                      f"{shutil.disk_usage(folder).free / 2**20:,.1f} MiB are free there{hint}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_output(out, write, nbytes, hint="") -> None:
    """write(folder) fills a fresh temporary folder in `out`, whose files then move into `out`: a failed write (a
    full disk: temp_dir's error, with `hint`) leaves no partial file there."""
    with temp_dir(out, out, nbytes, hint) as tmp:
        write(tmp)
        for file in tmp.iterdir():
            os.replace(file, Path(out) / file.name)


def save_state(model, optimizer, step, out, settings: dict, rank=0) -> Path:
    """<out>/checkpoints/step_N: each rank writes its own shards of the trained weights and the optimizer moments, in
    parallel, with torch.distributed.checkpoint (DCP), which reshards on load: a state written by N ranks resumes on
    M. Step, RNG and `settings` (what a resume must match) go to state.json. Only the newest state is kept. DCP's
    index (.metadata) is a pickle: FileSystemWriter has no other format; StateReader reads it."""
    weights = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True))  # local shards
    optim = get_optimizer_state_dict(model, optimizer)  # {"state": {name: {step, exp_avg, exp_avg_sq}}, groups}
    rng = {"torch": torch.get_rng_state().tolist(), "python": random.getstate(),
           "numpy": [x.tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
           "cuda": torch.cuda.get_rng_state().tolist() if torch.cuda.is_available() else None}
    world = dist.get_world_size() if dist.is_initialized() else 1
    rngs = [None] * world if dist.is_initialized() else [rng]
    if dist.is_initialized():
        dist.all_gather_object(rngs, rng)
    final = Path(out) / "checkpoints" / f"step_{step:07d}"
    local = lambda v: v.to_local() if isinstance(v, DTensor) else v  # noqa: E731
    nbytes = world * sum(local(v).numel() * local(v).element_size() for v in
                         [*weights.values(), *(t for s in optim["state"].values() for t in s.values())])
    with temp_dir(final.parent, final, nbytes) if rank == 0 else nullcontext() as tmp:
        names = [str(tmp)]
        if dist.is_initialized():
            dist.broadcast_object_list(names, src=0)  # rank 0's fresh temporary folder
        try:
            dcp.save({"model": weights, "optimizer": optim["state"]}, storage_writer=FileSystemWriter(names[0]),
                     no_dist=not dist.is_initialized())
        except CheckpointException as e:  # DCP gathers every rank's failure: the write that failed, for temp_dir
            failures = [exc for exc, _ in e.failures.values()]
            raise next((x for x in failures if isinstance(x, OSError) or WRITE_FAILED.search(str(x))), e) from None
        if rank == 0:
            state = {"step": step, **settings, "rng": rngs, "world_size": world}
            write_json(tmp / "state.json", state, indent=None)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    if rank == 0:
        for old in final.parent.glob("step_*"):
            if old != final:
                shutil.rmtree(old)
    if dist.is_initialized():
        dist.barrier()
    return final


def latest_state(out):
    states = sorted((Path(out) / "checkpoints").glob("step_*"))  # temporary folders start with "."
    return states[-1] if states else None


class StateReader(FileSystemReader):
    """DCP's reader with its .metadata pickle read against an exact allow-list: DCP's metadata classes, torch.Size,
    dtypes, memory layouts and paths, nothing callable and no dotted name, so a training state from elsewhere can
    never run code. load_state then refuses any entry that is not a tensor (DCP would torch.load a "bytes" entry
    with weights_only=False) and any data file outside the state's folder."""
    ALLOWED = {("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")} | {
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"), ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}
    LAYOUTS = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}  # "torch.strided": ...

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in StateReader.ALLOWED:
                return super().find_class(module, name)
            if (module, name) == ("torch.serialization", "_get_layout"):  # a layout by its name, from a fixed table
                return StateReader.LAYOUTS.__getitem__
            if module == "torch" and name.isidentifier() and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
            raise pickle.UnpicklingError(f"a training state's .metadata may not build {module}.{name}")

    def __init__(self, path):
        super().__init__(str(path))
        self.checkpoint_dir = path

    def read_metadata(self, *args, **kwargs):
        with open(Path(self.checkpoint_dir) / ".metadata", "rb") as f:
            metadata = self.Unpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def load_state(path, out, model, optimizer, settings: dict, rank=0, last_step=None) -> int:
    """Resume from save_state's folder `path` ("latest": the newest in <out>/checkpoints): settings must equal the
    saved ones, every trained parameter must be there with its shape; weights and optimizer moments are resharded
    onto this run's ranks, and the optimizer keeps this run's hyperparameters (lr, projector lr, weight decay).
    Returns the step (at most last_step). Anything damaged or foreign is a ValueError naming the file."""
    path = latest_state(out) if path == "latest" else Path(path)
    if path is None:
        raise FileNotFoundError(f"--resume: no training state in {Path(out) / 'checkpoints'}")
    if not (path / "state.json").is_file() or not (path / ".metadata").is_file():
        raise ValueError(f"{path} is not a training state (no state.json and .metadata)")
    state = read_json(path / "state.json")
    step = state.get("step") if isinstance(state, dict) else None
    if type(step) is not int or not 0 <= step <= (step if last_step is None else last_step):
        raise ValueError(f"{path / 'state.json'}: 'step' is {step!r}, not a step of this run (0..{last_step})")
    for key, value in settings.items():
        if state.get(key) != value:
            raise ValueError(f"{path} was trained with {key}={state.get(key)!r}, this run has {value!r}")
    reader = StateReader(path)
    try:
        metadata = reader.read_metadata()
        saved = metadata.state_dict_metadata  # {"model.<name>": its full size, ...}
        files = [info.relative_path for info in metadata.storage_data.values()]
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as e:
        raise ValueError(f"{path / '.metadata'} is not a training state's index: {e}") from None
    for key, entry in saved.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise ValueError(f"{path / '.metadata'}: entry {key!r} is {type(entry).__name__}, not a tensor: a training "
                             "state holds tensors only")
    if not all(isinstance(f, str) and f == os.path.basename(f) and f.endswith(".distcp") for f in files):
        raise ValueError(f"{path / '.metadata'}: a data file is not a .distcp file in the state's folder")
    for name, param in model.named_parameters():  # DTensor shapes are the full ones
        if not param.requires_grad:
            continue
        if f"model.{name}" not in saved:
            raise ValueError(f"{path} has no {name}: a state of another stage or projector")
        if tuple(saved[f"model.{name}"].size) != tuple(param.shape):
            raise ValueError(f"{path}: {name} is {list(saved[f'model.{name}'].size)}, this model's is "
                             f"{list(param.shape)}: the state comes from a model of another width or projector")
    weights = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True))
    optim = get_optimizer_state_dict(model, optimizer)  # zero moments of the right shapes, filled in place
    try:
        dcp.load({"model": weights, "optimizer": optim["state"]}, storage_reader=reader,  # reshards N ranks -> M
                 no_dist=not dist.is_initialized())
    except (CheckpointException, OSError, RuntimeError) as e:  # a missing or damaged .distcp file
        reason = next((exc for exc, _ in e.failures.values()), e) if isinstance(e, CheckpointException) else e
        raise ValueError(f"{path}: the training state's data cannot be read: {str(reason).splitlines()[0]}") from None
    set_model_state_dict(model, weights, options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, optimizer, optim)  # the moments read above, this run's param groups
    try:
        rng = state["rng"][min(rank, len(state["rng"]) - 1)]
        torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))
        random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
        np.random.set_state((rng["numpy"][0], np.array(rng["numpy"][1], dtype=np.uint32), *rng["numpy"][2:]))
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(torch.tensor(rng["cuda"], dtype=torch.uint8))
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path / 'state.json'}: 'rng' is not the RNG state save_state writes ({e!r})") from None
    return state["step"]


def trim_metrics(path, step) -> None:
    """Keep the records up to `step` (the folder is made if need be): a run that died after its last training state
    logged steps that the resumed run repeats, and a fresh run (step 0) starts a fresh log."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    records = read_jsonl(path)
    if any(r.get("step", 0) > step for r in records):
        write_text(path, "".join(json.dumps(r) + "\n" for r in records if r.get("step", 0) <= step))
