"""A checkpoint directory on disk: config, shard index, safetensors headers. Torch only to read data.

Headers are parsed here directly (8-byte little-endian length + JSON), so ``inspect`` and the
validation of a 24 GB checkpoint need neither torch nor reading any tensor data.

Example:
    >>> ckpt = Checkpoint.open("./model")          # validates config, index, shards, shapes
    >>> ckpt.arch.layer_pattern, ckpt.dtype, ckpt.weights_bytes
    >>> w = ckpt.read("backbone.norm_f.weight")    # one tensor, read from its shard
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .arch import Arch, read_config
from .errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
ELASTIC_CONFIG_NAME = "elastic_config.json"
# safetensors dtype code -> (name, bytes per element)
DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
# Tensors that transformers itself ignores on load (multi-token-prediction heads).
IGNORED_PREFIXES = ("mtp.",)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, from the safetensors header."""

    name: str
    file: Path
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    offsets: tuple[int, int]  # byte range inside the data section

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def dtype_name(self) -> str:
        return DTYPES.get(self.dtype, (self.dtype.lower(), 0))[0]


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header. Returns (header dict, byte offset where data starts).

    Raises:
        CheckpointError: the file is missing, truncated, or its header is not valid.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError("truncated safetensors file (shorter than its 8-byte header length)", path=str(path))
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"truncated or corrupt safetensors file (header says {n} bytes, file has {size})", path=str(path)
                )
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"cannot read ({e.strerror})", path=str(path)) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError("corrupt safetensors header (not JSON)", path=str(path)) from None
    if not isinstance(header, dict):
        raise CheckpointError("corrupt safetensors header (not an object)", path=str(path))
    data_start = 8 + n
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if data_start + end > size:
        raise CheckpointError(
            f"truncated safetensors file: tensors need {data_start + end} bytes, the file has {size}; "
            "download or copy it again",
            path=str(path),
        )
    return header, data_start


def _inside(root: Path, name: str) -> bool:
    """True when shard ``name`` is a plain file name that stays inside ``root``."""
    if not name or os.path.isabs(name) or Path(name).name != name:
        return False
    return (root / name).resolve().parent == root.resolve()


class Checkpoint:
    """A Hugging Face ``nemotron_h`` directory: config, optional weights, optional elastic sidecar.

    Use :meth:`open`; it validates everything it can and raises one error listing all problems.
    """

    def __init__(self, root: Path, config: dict[str, Any], arch: Arch, tensors: dict[str, TensorInfo]):
        self.root = root
        self.config = config
        self.arch = arch
        self.tensors = tensors  # name -> TensorInfo; empty when the weights are absent

    # ---- opening and validation ---------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, require_weights: bool = False) -> "Checkpoint":
        """Open and validate a checkpoint directory.

        Args:
            path: the directory (or its config.json).
            require_weights: raise when no weights are present (else config-only mode).

        Raises:
            ConfigError: config.json missing or invalid.
            CheckpointError: a shard is missing, truncated, outside the directory, or a tensor
                disagrees with the config (every problem listed).
        """
        root = Path(path)
        if root.is_file() and root.name == "config.json":
            root = root.parent
        if not root.is_dir():
            raise CheckpointError("no such checkpoint directory", path=str(root))
        config = read_config(root / "config.json")
        arch = Arch.from_config(config, source=str(root / "config.json"))
        tensors = cls._scan_weights(root)
        if require_weights and not tensors:
            raise CheckpointError(
                f"no weights: expected {SINGLE_NAME} or {INDEX_NAME} beside config.json", path=str(root)
            )
        ckpt = cls(root, config, arch, tensors)
        if tensors:
            problems = ckpt.shape_problems()
            if problems:
                raise CheckpointError(
                    f"the weights disagree with config.json ({len(problems)} problems)",
                    problems=_cap(problems),
                    path=str(root),
                )
        return ckpt

    @staticmethod
    def _scan_weights(root: Path) -> dict[str, TensorInfo]:
        index_path = root / INDEX_NAME
        if index_path.is_file():
            try:
                index = json.loads(index_path.read_text())
                weight_map = index["weight_map"]
                assert isinstance(weight_map, dict)
            except (json.JSONDecodeError, KeyError, TypeError, AssertionError, UnicodeDecodeError):
                raise CheckpointError("not a valid shard index (needs a 'weight_map' object)", path=str(index_path)) from None
            problems = []
            for shard in sorted(set(weight_map.values())):
                if not isinstance(shard, str) or not _inside(root, shard):
                    problems.append(f"shard name {shard!r} points outside the checkpoint directory; refused")
                elif not (root / shard).is_file():
                    n = sum(1 for s in weight_map.values() if s == shard)
                    problems.append(f"missing shard {shard} (holds {n} tensors)")
            if problems:
                raise CheckpointError("broken shard index", problems=_cap(problems), path=str(index_path))
            files = sorted({root / s for s in weight_map.values()})
        elif (root / SINGLE_NAME).is_file():
            weight_map, files = None, [root / SINGLE_NAME]
        else:
            stray = sorted(p.name for p in root.glob("*.safetensors"))
            if stray:
                raise CheckpointError(
                    f"found {', '.join(stray[:3])} but no {INDEX_NAME} saying which tensor is where", path=str(root)
                )
            return {}
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            header, _ = read_header(file)
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if weight_map is not None and weight_map.get(name) != file.name:
                    continue  # the index is the authority on where a tensor lives
                tensors[name] = TensorInfo(name, file, meta["dtype"], tuple(meta["shape"]), tuple(meta["data_offsets"]))
        if weight_map is not None:
            lost = [n for n in weight_map if n not in tensors]
            if lost:
                raise CheckpointError(
                    f"{len(lost)} tensors listed in the index are not in their shard",
                    problems=_cap([f"{n} (index says {weight_map[n]})" for n in lost]),
                    path=str(index_path),
                )
        return tensors

    def shape_problems(self) -> list[str]:
        """Every difference between the tensors on disk and what config.json implies."""
        expected = self.arch.tensor_shapes()
        problems = []
        for name, shape in expected.items():
            info = self.tensors.get(name)
            if info is None:
                problems.append(f"missing tensor {name} {list(shape)}")
            elif info.shape != shape:
                problems.append(f"{name}: config implies shape {list(shape)}, {info.file.name} has {list(info.shape)}")
        for name in self.tensors:
            if name not in expected and not name.startswith(IGNORED_PREFIXES):
                problems.append(f"unexpected tensor {name} in {self.tensors[name].file.name} (not in config.json's layout)")
        return problems

    # ---- facts ---------------------------------------------------------------------------
    @property
    def has_weights(self) -> bool:
        return bool(self.tensors)

    @property
    def is_elastic(self) -> bool:
        return (self.root / ELASTIC_CONFIG_NAME).is_file()

    @property
    def weight_files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})

    @property
    def weights_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.weight_files)

    @property
    def bytes_on_disk(self) -> int:
        """Every regular file in the directory (what a user downloads)."""
        return sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    @property
    def dtype(self) -> str | None:
        """The dtype holding most of the parameters, else the config's ``torch_dtype``/``dtype``."""
        if self.tensors:
            by_dtype: Counter[str] = Counter()
            for t in self.tensors.values():
                by_dtype[t.dtype_name] += t.numel
            return by_dtype.most_common(1)[0][0]
        return self.config.get("dtype") or self.config.get("torch_dtype")

    # ---- reading data (torch) -----------------------------------------------------------
    def read(self, name: str, index: tuple | None = None):
        """Read one tensor (or ``index``, a tuple of slices, of it) without loading its shard.

        Returns:
            a CPU ``torch.Tensor`` in the dtype on disk.
        """
        from safetensors import safe_open

        info = self.tensors[name]
        with safe_open(str(info.file), framework="pt", device="cpu") as f:
            if index is None:
                return f.get_tensor(name)
            return f.get_slice(name)[index]

    def iter_tensors(self, names: list[str] | None = None) -> Iterator[tuple[str, Any]]:
        """Yield (name, tensor) one at a time, opening each shard once."""
        from safetensors import safe_open

        wanted = set(names) if names is not None else set(self.tensors)
        for file in self.weight_files:
            here = [n for n, t in self.tensors.items() if t.file == file and n in wanted]
            if not here:
                continue
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in here:
                    yield name, f.get_tensor(name)


def _cap(problems: list[str], n: int = 20) -> list[str]:
    """At most n problems, then a count of the rest."""
    return problems if len(problems) <= n else [*problems[:n], f"... and {len(problems) - n} more"]


# ---- writing ----------------------------------------------------------------------------------


class ShardedWriter:
    """Write a checkpoint atomically: into a temporary directory beside ``out``, renamed at the end.

    Tensors are buffered until a shard reaches ``max_shard_bytes`` and then written, so memory
    holds at most one shard. On any exception inside the ``with`` block the temporary directory
    is removed and ``out`` is untouched. An existing ``out`` is replaced only with ``force``.

    Example:
        >>> with ShardedWriter("./model", max_shard_bytes=2**30) as w:
        ...     w.add_json("config.json", config)
        ...     for name, t in tensors: w.add(name, t)
    """

    def __init__(self, out: str | Path, max_shard_bytes: int = 2 * 2**30, force: bool = False):
        import tempfile

        self.out = Path(out)
        if self.out.exists() and not force:
            raise CheckpointError("already exists; pass --force to replace it", path=str(self.out))
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        self.force = force
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []  # tensor names of each written shard
        self.bytes_written = 0

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        import shutil

        if exc_type is None:
            self.commit()
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def add(self, name: str, tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes

    def add_json(self, filename: str, data: dict) -> None:
        self.add_text(filename, json.dumps(data, indent=2, sort_keys=True) + "\n")

    def add_text(self, filename: str, text: str) -> None:
        (self.tmp / filename).write_text(text)

    def add_file(self, src: Path, filename: str | None = None) -> None:
        import shutil

        shutil.copyfile(src, self.tmp / (filename or src.name))

    def _flush(self) -> None:
        from safetensors.torch import save_file

        k = len(self._shards)
        save_file(self._pending, str(self.tmp / f"shard-{k:05d}.tmp"), metadata={"format": "pt"})
        self._shards.append(sorted(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def commit(self) -> Path:
        import shutil

        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            (self.tmp / "shard-00000.tmp").rename(self.tmp / SINGLE_NAME)
        else:
            weight_map, total = {}, 0
            for k, names in enumerate(self._shards):
                final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
                (self.tmp / f"shard-{k:05d}.tmp").rename(self.tmp / final)
                weight_map.update({name: final for name in names})
                header, start = read_header(self.tmp / final)
                total += sum(v["data_offsets"][1] - v["data_offsets"][0] for key, v in header.items() if key != "__metadata__")
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            self.add_json(INDEX_NAME, index)
        umask = os.umask(0)
        os.umask(umask)
        for p in self.tmp.iterdir():  # mkdtemp and some writers use 0600; give normal modes
            p.chmod(0o666 & ~umask)
        self.tmp.chmod(0o777 & ~umask)
        self.bytes_written = sum(p.stat().st_size for p in self.tmp.iterdir())
        if self.out.exists():  # force was checked in __init__; swap so `out` is never half there
            old = self.tmp.with_name(self.tmp.name.replace(".partial-", ".old-"))
            self.out.rename(old)
            self.tmp.rename(self.out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            self.tmp.rename(self.out)
        return self.out
