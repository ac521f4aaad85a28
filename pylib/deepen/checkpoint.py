"""Apply a layer plan to a checkpoint folder, streaming: the model is never held in memory.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's dtype, shape
and byte range (`data_offsets`, relative to the end of the header), then the raw bytes. Growing a model only
renames, repeats and zeroes whole tensors, so every tensor of the output is either a byte range of an input
file, copied as it is (the kernel copies it: `os.copy_file_range`), or zeros (left as a hole in a sparse file:
it reads back as zeros and costs no writing). Nothing is decoded, dtypes stay what they were (bf16 stays bf16),
and memory stays at a few MiB whatever the model's size.

    >>> from deepen.plan import llama_pro
    >>> expand("smollm2", "smollm2-pro", llama_pro(30, groups=6))   # doctest: +SKIP

The output is an ordinary Hugging Face folder (`AutoModelForCausalLM.from_pretrained` loads it) with
`expansion.json`, written into a temporary folder and renamed into place only when complete.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from deepen.grow import LAYER_PREFIX, OUTPUT_PROJECTIONS, grown_config
from deepen.manifest import Manifest, atomic_folder
from deepen.models import is_hub_id, resolve
from deepen.plan import Plan

CONFIG = "config.json"
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# Weight files of any format: never copied over as "small files" (the output carries its own safetensors).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".pkl",
                   ".npz", ".index.json")
# What a hub download fetches: config, tokenizer files, weights; never pickle unless allowed.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
HUB_PICKLE_PATTERNS = ["*.bin", "*.pt"]

# Bytes per element of each safetensors dtype (sub-byte and unknown dtypes are copied without a size check).
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8, "C64": 8}
DTYPE_NAMES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn",
               "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16", "I32": "int32",
               "U32": "uint32", "F32": "float32", "F64": "float64", "I64": "int64", "U64": "uint64",
               "C64": "complex64"}
MAX_HEADER = 100_000_000  # the safetensors format's own limit on the JSON header
CHUNK = 64 * 2**20  # bytes per copy call: the progress bar moves, memory stays tiny

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_LAYER = re.compile(r"^" + re.escape(LAYER_PREFIX) + r"(\d+)\.(.+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as it is: corrupt or truncated files, an inconsistent index, pickle."""


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "500MB", "5GB" (powers of 10) or "2GiB" (powers of 2)."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
        if not m or m[2].lower() not in _UNITS:
            raise ValueError(f"cannot read the size {size!r}; write bytes as an int or e.g. '500MB', '5GB', '2GiB'")
        n = int(float(m[1]) * _UNITS[m[2].lower()])
    if n < 1:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return n


# ---------------------------------------------------------------------------------------------- reading headers

@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype string: "BF16", "F32", ...
    shape: tuple[int, ...]
    file: Path | None  # None: written as zeros
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict]:
    """The tensors of a safetensors file (name -> TensorInfo with absolute offsets) and its `__metadata__`,
    read from the header alone; raises CheckpointError on a truncated or corrupt file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file: {size} bytes, too short for a header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{path} is truncated or corrupt: its header claims {n} bytes but the file has "
                                  f"{size} in all")
        if n > MAX_HEADER:
            raise CheckpointError(f"{path} is corrupt: a {n}-byte header is beyond the format's limit")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt: its header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupt: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    start, data_size = 8 + n, size - 8 - n
    tensors = {}
    for name, t in header.items():
        try:
            dtype, shape, (begin, end) = t["dtype"], tuple(int(d) for d in t["shape"]), t["data_offsets"]
            begin, end = int(begin), int(end)
        except (TypeError, KeyError, ValueError):
            raise CheckpointError(f"{path} is corrupt: bad header entry for {name!r}: {t!r}") from None
        if not 0 <= begin <= end or end > data_size:
            raise CheckpointError(f"{path} is truncated or corrupt: tensor {name!r} spans bytes {begin}..{end} of "
                                  f"the data but the file holds only {data_size} bytes of data")
        numel = math.prod(shape)
        if dtype in DTYPE_SIZES and numel * DTYPE_SIZES[dtype] != end - begin:
            raise CheckpointError(f"{path} is corrupt: tensor {name!r} ({dtype} {list(shape)}) needs "
                                  f"{numel * DTYPE_SIZES[dtype]} bytes but its offsets span {end - begin}")
        tensors[name] = TensorInfo(name, dtype, shape, path, start + begin, end - begin)
    return tensors, metadata


# ------------------------------------------------------------------------------------------- finding the source

def resolve_source(src: str | os.PathLike, allow_pickle: bool = False) -> Path:
    """A local folder for `src`: a folder as it is, "smollm2" as the offline copy, anything else a hub id
    (downloaded, or found in the local hub cache when offline)."""
    path = Path(resolve(src)).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{src} is a file; expand takes a model folder (config.json + weights) or a hub id")
    if not is_hub_id(src):
        raise FileNotFoundError(f"{src} not found: no such folder (and it is not a hub id like 'owner/model')")
    return _download(str(src), allow_pickle)


def _download(repo_id: str, allow_pickle: bool) -> Path:
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
        if allow_pickle and not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS + HUB_PICKLE_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated repo, network: one clear message
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
        hint = ("HF_HUB_OFFLINE is set, so only models already in the local hub cache can be used; unset it or "
                "download the model first" if offline else "check the name, your network and your hub login")
        raise FileNotFoundError(f"{repo_id} is not a local folder and could not be fetched from the Hugging Face "
                                f"Hub ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); {hint}. "
                                f"A local folder works too.") from None
    return path


def read_hf_config(src: str | os.PathLike) -> dict:
    """The config.json of a model folder or hub id, as a dict (e.g. to build a plan for its num_hidden_layers)."""
    return read_folder_config(resolve_source(src))


def read_folder_config(folder: Path) -> dict:
    path = folder / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {folder} is not a Hugging Face model folder (it needs "
                                f"config.json next to the weights)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def _read_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a valid index ({type(e).__name__}: {e})") from None
    missing = sorted({f for f in weight_map.values() if not (path.parent / f).is_file()})
    if missing:
        raise FileNotFoundError(f"{path.name} names shard(s) missing from {path.parent}: {', '.join(missing)}; "
                                f"the download or copy is incomplete")
    return weight_map


def _safetensors_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files of a folder and, when sharded, its index's weight map."""
    if (folder / SAFE_INDEX).is_file():
        weight_map = _read_index(folder / SAFE_INDEX)
        return [folder / f for f in sorted(set(weight_map.values()))], weight_map
    if (folder / SAFE_SINGLE).is_file():
        return [folder / SAFE_SINGLE], None
    return sorted(folder.glob("*.safetensors")), None


def _pickle_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    if (folder / PICKLE_INDEX).is_file():
        weight_map = _read_index(folder / PICKLE_INDEX)
        return [folder / f for f in sorted(set(weight_map.values()))], weight_map
    return sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file()), None


def read_tensors(files: list[Path], weight_map: dict[str, str] | None) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint (in file order, then data order) from the safetensors headers alone."""
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        found, _ = read_header(path)
        if weight_map is not None:
            wanted = [name for name, f in weight_map.items() if path.name == f]
            missing = [name for name in wanted if name not in found]
            if missing:
                raise CheckpointError(f"the index maps {len(missing)} tensor(s) to {path.name} that it does not "
                                      f"contain, e.g. {missing[0]!r}: the index and the shards do not match")
            found = {name: found[name] for name in wanted}
        for name, t in sorted(found.items(), key=lambda kv: kv[1].offset):
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} is in both {tensors[name].file.name} and {path.name}")
            tensors[name] = t
    return tensors


# ------------------------------------------------------------------------------------------ pickle (if allowed)

_TORCH_DTYPES = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "float8_e5m2": "F8_E5M2", "float8_e4m3fn": "F8_E4M3",
                 "int16": "I16", "uint16": "U16", "float16": "F16", "bfloat16": "BF16", "int32": "I32",
                 "uint32": "U32", "float32": "F32", "float64": "F64", "int64": "I64", "uint64": "U64",
                 "complex64": "C64"}


def _convert_pickle(path: Path, out: Path, names: list[str] | None) -> Path:
    """One pickle shard (loaded with weights_only=True: tensors only, no code) rewritten as safetensors."""
    import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path} as a weights-only PyTorch checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a plain state dict of tensors")
    if names is not None:
        missing = [n for n in names if n not in state]
        if missing:
            raise CheckpointError(f"the index maps tensor {missing[0]!r} to {path.name}, which does not contain it")
        state = {n: state[n] for n in names}
    data = {}
    for name, t in state.items():
        key = str(t.dtype).removeprefix("torch.")
        if key not in _TORCH_DTYPES:
            raise CheckpointError(f"tensor {name!r} in {path.name} has dtype {t.dtype}, which safetensors cannot hold")
        data[name] = (_TORCH_DTYPES[key], tuple(t.shape), t)

    def chunks(t):
        yield t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data

    _write_safetensors(out, [(n, d, s, t.numel() * t.element_size(), chunks(t)) for n, (d, s, t) in data.items()])
    return out


# --------------------------------------------------------------------------------------------------- writing

def _header_bytes(entries: list[tuple[str, str, tuple[int, ...], int]]) -> bytes:
    """A safetensors header for (name, dtype, shape, nbytes) laid out contiguously in this order, padded with
    spaces to a multiple of 8 bytes so the data starts aligned."""
    header: dict = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _write_safetensors(path: Path, items) -> None:
    """Write (name, dtype, shape, nbytes, iterable of byte chunks) as a safetensors file."""
    with open(path, "wb") as f:
        f.write(_header_bytes([(n, d, s, b) for n, d, s, b, _ in items]))
        for name, _, _, nbytes, chunks in items:
            written = 0
            for chunk in chunks:
                written += f.write(chunk)
            if written != nbytes:
                raise CheckpointError(f"wrote {written} bytes for {name!r}, expected {nbytes}")


def write_all(fd: int, data) -> None:
    """Write all of `data` (a buffer) to the raw descriptor `fd`, however many calls os.write takes."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _Copier:
    """Copies byte ranges of input files to the end of an output file (a raw descriptor, written in order): in
    the kernel where it can (`os.copy_file_range`: no bytes pass through Python), else through one buffer."""

    def __init__(self, progress):
        self.fds: dict[Path, int] = {}
        self.progress = progress
        self.kernel = hasattr(os, "copy_file_range")
        self.buffer: memoryview | None = None

    def _open(self, path: Path) -> int:
        if path not in self.fds:
            self.fds[path] = os.open(path, os.O_RDONLY)
        return self.fds[path]

    def copy(self, src: Path, offset: int, nbytes: int, out: int) -> None:
        fd, end = self._open(src), offset + nbytes
        while offset < end:
            n = min(CHUNK, end - offset)
            done = self._kernel_copy(fd, offset, n, out) if self.kernel else 0
            if not done:
                done = self._buffered_copy(fd, offset, n, out)
            if not done:
                raise CheckpointError(f"unexpected end of file in {src} at byte {offset}: was it truncated while "
                                      f"being read?")
            offset += done
            self.progress.update(done)

    def _kernel_copy(self, fd: int, offset: int, n: int, out: int) -> int:
        try:
            return os.copy_file_range(fd, out, n, offset)
        except OSError:  # not supported for this kernel or file-system pair: copy through a buffer from now on
            self.kernel = False
            return 0

    def _buffered_copy(self, fd: int, offset: int, n: int, out: int) -> int:
        if self.buffer is None:
            self.buffer = memoryview(bytearray(CHUNK))
        if hasattr(os, "preadv"):
            done = os.preadv(fd, [self.buffer[:n]], offset)
        else:
            data = os.pread(fd, n, offset)
            done = len(data)
            self.buffer[:done] = data
        write_all(out, self.buffer[:done])
        return done

    def skip_zeros(self, nbytes: int, out: int) -> None:
        """Zeros cost nothing to write: move past them, leaving a hole that reads back as zeros (the file is
        sparse where the file system supports it, else the kernel fills in zeros). The caller sets the final
        size with ftruncate so that zeros at the very end exist too."""
        os.lseek(out, nbytes, os.SEEK_CUR)
        self.progress.update(nbytes)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def expanded_tensors(tensors: dict[str, TensorInfo], plan: Plan) -> list[TensorInfo]:
    """The grown model's tensors, in order: what precedes the layers, the layers by the plan (layer i renamed
    from layer plan.sources[i], output projections of zeroed layers as zeros), then the rest."""
    before, after, layers = [], [], {}
    for name, t in tensors.items():
        m = _LAYER.match(name)
        if m is None:
            (after if layers else before).append(t)
        else:
            layers.setdefault(int(m[1]), []).append((m[2], t))
    outside = sorted(i for i in layers if not 0 <= i < plan.n_base)
    if outside:
        raise CheckpointError(f"the checkpoint holds layer(s) {outside} but its config says {plan.n_base} layers")
    absent = sorted(set(range(plan.n_base)) - set(layers))
    if absent:
        raise CheckpointError(f"the checkpoint has no tensors for layer(s) {absent} of its {plan.n_base} layers")
    grown = list(before)
    for i, spec in enumerate(plan.layers):
        zeroed = set()
        for suffix, t in layers[spec.source]:
            module = suffix.rsplit(".", 1)[0]
            zero = spec.zero and module in OUTPUT_PROJECTIONS
            if zero:
                zeroed.add(module)
            grown.append(TensorInfo(f"{LAYER_PREFIX}{i}.{suffix}", t.dtype, t.shape, None if zero else t.file,
                                    t.offset, t.nbytes))
        if spec.zero and zeroed != set(OUTPUT_PROJECTIONS):
            missing = ", ".join(f"{LAYER_PREFIX}{spec.source}.{m}.weight"
                                for m in OUTPUT_PROJECTIONS if m not in zeroed)
            raise CheckpointError(f"layer {i} must have its output projections zeroed but the checkpoint has no "
                                  f"{missing}: its layers are not laid out like Llama's")
    return grown + after


def shard(tensors: list[TensorInfo], max_bytes: int) -> list[list[TensorInfo]]:
    """Split into shards of at most max_bytes of tensor data (a bigger tensor gets a shard of its own), keeping
    the order; within a shard, wider dtypes first so that every tensor starts aligned to its element size."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return [sorted(s, key=lambda t: -DTYPE_SIZES.get(t.dtype, 1)) for s in shards]


def write_shards(folder: Path, tensors: list[TensorInfo], write, max_bytes: int) -> list[str]:
    """Write `tensors` into `folder` as safetensors shards of at most max_bytes (one model.safetensors when it
    fits, else model-0000k-of-0000n.safetensors and their index): the headers here, each tensor's bytes by
    write(tensor, fd), which appends exactly tensor.nbytes bytes (or skips them: zeros in a sparse file).
    Returns the shard file names."""
    shards = shard(tensors, max_bytes)
    names = ([SAFE_SINGLE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, part in zip(names, shards):
        fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            header = _header_bytes([(t.name, t.dtype, t.shape, t.nbytes) for t in part])
            write_all(fd, header)
            for t in part:
                write(t, fd)
            os.ftruncate(fd, len(header) + sum(t.nbytes for t in part))
        finally:
            os.close(fd)
    if len(shards) > 1:
        index = {"metadata": {"total_parameters": sum(t.numel for t in tensors),
                              "total_size": sum(t.nbytes for t in tensors)},
                 "weight_map": {t.name: name for name, part in zip(names, shards) for t in part}}
        (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names


def checkpoint_tensors(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of a safetensors checkpoint folder, from its headers alone (pickle weights refused)."""
    files, weight_map = _safetensors_files(folder)
    if not files:
        raise FileNotFoundError(f"{folder} has no safetensors weights (*.safetensors or {SAFE_INDEX})")
    return read_tensors(files, weight_map)


def copy_small_files(src: Path, dst: Path) -> list[str]:
    """Tokenizer files, generation_config.json, chat templates, README...: every top-level file but the
    weights, the config (rewritten) and hidden files."""
    copied = []
    for path in sorted(src.iterdir()):
        name = path.name
        if (not path.is_file() or name.startswith(".") or name == CONFIG or name.endswith(WEIGHT_SUFFIXES)
                or path.suffix in PICKLE_SUFFIXES):
            continue
        shutil.copy2(path, dst / name)
        copied.append(name)
    return copied


def _main_dtype(tensors: list[TensorInfo]) -> str:
    by_dtype: dict[str, int] = {}
    for t in tensors:
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.nbytes
    top = max(by_dtype, key=by_dtype.get) if by_dtype else "F32"
    return DTYPE_NAMES.get(top, top)


# ------------------------------------------------------------------------------------------------------ expand

def expand(src: str | os.PathLike, out: str | os.PathLike, plan: Plan | Callable[[int], Plan], *,
           max_shard_size: int | str = "5GB", overwrite: bool = False, allow_pickle: bool = False,
           progress: bool = True) -> Path:
    """Apply `plan` to the checkpoint `src` (a model folder, a hub id, or "smollm2") and write the grown model
    to the folder `out`, streaming tensor bytes from file to file. `plan` may also be a function of the base's
    number of layers, e.g. `lambda n: llama_pro(n, groups=8)`. Returns `out`.

    Pickle checkpoints (.bin/.pt) are refused unless allow_pickle=True: unpickling can run code. They are then
    loaded one shard at a time with `weights_only=True` and written as safetensors."""
    from tqdm.auto import tqdm

    max_bytes = parse_size(max_shard_size)
    out = Path(out)
    local = Path(resolve(src)).expanduser()
    if local.is_dir() and (out.resolve() == local.resolve() or local.resolve() in out.resolve().parents
                           or out.resolve() in local.resolve().parents):
        raise ValueError(f"OUT {out} is {'SRC' if out.resolve() == local.resolve() else 'inside SRC or holds it'} "
                         f"({src}): growing a model into its own folder would replace the base; choose another OUT")
    with atomic_folder(out, overwrite=overwrite) as tmp:
        folder = resolve_source(src, allow_pickle)
        config = read_folder_config(folder)
        n_layers = config.get("num_hidden_layers")
        if callable(plan) and not isinstance(plan, Plan):
            plan = plan(n_layers)
        new_config = grown_config(config, plan)  # refuses unsupported/MoE models and a plan of the wrong size

        files, weight_map = _safetensors_files(folder)
        fmt = "safetensors"
        if not files:
            files, weight_map = _pickle_files(folder)
            if not files:
                raise FileNotFoundError(f"{folder} has config.json but no weights (*.safetensors or "
                                        f"{SAFE_INDEX})")
            if not allow_pickle:
                raise CheckpointError(
                    f"{folder} holds only pickle weights ({', '.join(f.name for f in files[:3])}"
                    f"{', ...' if len(files) > 3 else ''}); loading pickle can run arbitrary code, so deepen refuses "
                    f"it unless you trust the files and pass allow_pickle=True (--allow-pickle). They are then "
                    f"loaded with torch.load(weights_only=True) and written as safetensors.")
            fmt = "pickle"
        source_files = [f.name for f in files]

        # Pickle shards become safetensors first (one shard in memory at a time), inside the temporary folder.
        scratch = tmp / ".pickle-converted"
        if fmt == "pickle":
            scratch.mkdir()
            converted = []
            for i, f in enumerate(tqdm(files, desc="converting pickle", unit="shard", disable=not progress)):
                names = None if weight_map is None else [n for n, s in weight_map.items() if s == f.name]
                converted.append(_convert_pickle(f, scratch / f"{i:05d}.safetensors", names))
            files, weight_map = converted, None

        tensors = read_tensors(files, weight_map)
        grown = expanded_tensors(tensors, plan)
        total = sum(t.nbytes for t in grown)
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"expand -> {out.name}",
                   disable=not progress)
        copier = _Copier(bar)

        def write(t: TensorInfo, fd: int) -> None:
            if t.file is None:
                copier.skip_zeros(t.nbytes, fd)
            else:
                copier.copy(t.file, t.offset, t.nbytes, fd)

        try:
            names = write_shards(tmp, grown, write, max_bytes)
        finally:
            copier.close()
            bar.close()
        shutil.rmtree(scratch, ignore_errors=True)

        copied = copy_small_files(folder, tmp)
        (tmp / CONFIG).write_text(json.dumps(new_config, indent=2) + "\n")
        resolved = {} if Path(src) == folder else {"resolved": str(folder)}  # a hub id: where it was read from
        Manifest(base=str(src), plan=plan, extra={**resolved, "source_files": source_files, "source_format": fmt,
                                                  "dtype": _main_dtype(grown), "files": names, "total_size": total,
                                                  "copied_files": copied}).write(tmp)
    return out
