"""A checkpoint directory on disk: config, shard index, safetensors headers. Torch only in
:meth:`Checkpoint.read`; :meth:`Checkpoint.read_bits` reads the same data into numpy.

A quantized checkpoint (NVIDIA Model Optimizer's unified layout: ``quantization_config`` in
config.json, ``hf_quant_config.json``) opens too: ``Checkpoint.quant`` says its layout
(``elastic.slicer.quant.layout``) and the tensors are validated against it.

Example:
    >>> ckpt = Checkpoint.open("./model")          # validates config, index, shards, shapes
    >>> ckpt.arch.layer_pattern, ckpt.dtype, ckpt.weights_bytes
    >>> ckpt.quant.quant_algo if ckpt.quant else None   # "W4A16_AWQ" for an int4 slice
    >>> w = ckpt.read("backbone.norm_f.weight")    # one torch tensor, read from its shard
    >>> b = ckpt.read_bits("backbone.norm_f.weight", (0, 8))  # its first 8 rows' raw bits, numpy
"""

from __future__ import annotations

import json
import os
import shlex
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from elastic.slicer.errors import CheckpointError
from elastic.slicer.formats.arch import Arch, read_config
from elastic.slicer.formats.safetensors import DTYPES, FLOAT_DTYPES, TensorInfo, _cap, bits_dtype, read_header
from elastic.slicer.quant.layout import OPTIONAL, QuantLayout, expected_tensors

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
ELASTIC_CONFIG_NAME = "elastic_config.json"
# safetensors files beside the weights that are not weights (elastic format sidecars)
SIDECAR_FILES = ("router.safetensors", "importance.safetensors")
# Tensors that transformers itself ignores on load (multi-token-prediction heads).
IGNORED_PREFIXES = ("mtp.",)


def _plain_name(name: Any) -> bool:
    """True when a shard name is a plain file name in the checkpoint directory (no directory part,
    not absolute, not "." or ".."). Where the file's symlink points is not our business: a Hugging
    Face cache snapshot links every file to ``../../blobs/HASH``."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name \
        and "\0" not in name and Path(name).name == name


# files nothing here reads: a link to a missing one is no reason to refuse the checkpoint
_DOC_FILES = (".gitattributes", "LICENSE", "NOTICE")


def missing_link(path: Path) -> str | None:
    """When ``path`` is a symbolic link whose target is missing (a Hugging Face cache snapshot after an
    interrupted download: ``snapshots/REV/FILE -> ../../blobs/HASH`` with no blob), a problem naming
    the link and its target; else None."""
    if not path.is_symlink() or path.exists():
        return None
    try:
        target = os.readlink(path)
    except OSError as e:
        return f"{path.name} is a link whose target cannot be read ({e.strerror})"
    full = os.path.normpath(os.path.join(os.path.abspath(path.parent), target))  # as written, no lookups
    return f"{path.name} is a link to {target}{f' ({full})' if full != target else ''}, which is missing"


def redownload_fix(root: Path, names: list[str]) -> str:
    """What to do about links whose targets are missing: for a Hugging Face cache snapshot
    (``CACHE/models--ORG--NAME/snapshots/REV``) the ``hf download`` command that fetches them again."""
    root = Path(os.path.abspath(root))
    repo, snapshots = root.parent.parent, root.parent
    if snapshots.name == "snapshots" and repo.name.startswith("models--") and repo.name.count("--") == 2:
        repo_id = "/".join(repo.name.split("--")[1:])
        cmd = " ".join(shlex.quote(w) for w in ["hf", "download", repo_id, *names, "--revision", root.name,
                                                 "--cache-dir", str(repo.parent)])
        return f"an interrupted download: fetch {'it' if len(names) == 1 else 'them'} again with `{cmd}`, or " \
               f"delete the broken link{'s' * (len(names) > 1)}"
    return f"download or copy {'it' if len(names) == 1 else 'them'} again, or delete the broken " \
           f"link{'s' * (len(names) > 1)}"


def refuse_missing_link(path: Path, error: type = CheckpointError) -> None:
    """Raise ``error`` (an ElasticError class) naming the link, its missing target and the fix when
    ``path`` is a link to a missing target: a file that is absent must not read as "not there"."""
    problem = missing_link(path)
    if problem:
        raise error(f"{problem}; {redownload_fix(path.parent, [path.name])}", path=str(path.parent))


def broken_links(root: Path) -> dict[str, str]:
    """The files of the checkpoint directory (not its documentation) that are links to a missing
    target: file name -> a problem naming the link and its target."""
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return {}
    out = {}
    for p in entries:
        problem = None if p.name.startswith(_DOC_FILES) or p.suffix == ".md" else missing_link(p)
        if problem:
            out[p.name] = problem
    return out


class Checkpoint:
    """A Hugging Face ``nemotron_h`` directory: config, optional weights, optional elastic sidecar.

    Use :meth:`open`; it validates everything it can and raises one error listing all problems.
    """

    def __init__(self, root: Path, config: dict[str, Any], arch: Arch, tensors: dict[str, TensorInfo],
                 quant: QuantLayout | None = None):
        self.root = root
        self.config = config
        self.arch = arch
        self.tensors = tensors  # name -> TensorInfo; empty when the weights are absent
        self.quant = quant  # the quantized layout, None for a float checkpoint

    # ---- opening and validation ---------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, require_weights: bool = False) -> "Checkpoint":
        """Open and validate a checkpoint directory.

        Args:
            path: the directory (or its config.json).
            require_weights: raise when no weights are present (else config-only mode).

        Raises:
            ConfigError: config.json missing or invalid, or a quantization it does not understand.
            CheckpointError: a file is a link to a missing target (a Hugging Face cache snapshot
                whose download was interrupted: every such link named, with the ``hf download`` that
                fetches them); a shard is missing, truncated, outside the directory, or a tensor
                disagrees with the config or the quantized layout (every problem listed).
        """
        root = Path(path)
        if root.is_file() and root.name == "config.json":
            root = root.parent
        if not root.is_dir():
            raise CheckpointError("no such checkpoint directory", path=str(root))
        broken = broken_links(root)  # before anything is read: a missing sidecar must not read as "absent"
        if broken:
            n = len(broken)
            raise CheckpointError(f"{n} file{'s' * (n > 1)} of the checkpoint {'are links' if n > 1 else 'is a link'} "
                                  f"to a missing target; {redownload_fix(root, list(broken))}",
                                  problems=_cap(list(broken.values())), path=str(root))
        config = read_config(root / "config.json")
        arch = Arch.from_config(config, source=str(root / "config.json"))
        quant = QuantLayout.read(root, config)
        tensors = cls._scan_weights(root)
        ckpt = cls(root, config, arch, tensors, quant)
        if require_weights:
            ckpt.require_weights()
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
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise CheckpointError("not a valid shard index (not JSON)", path=str(index_path)) from None
            except OSError as e:
                raise CheckpointError(f"cannot read ({e.strerror})", path=str(index_path)) from None
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError("not a valid shard index (needs a non-empty 'weight_map' object of "
                                      "tensor name -> shard file name)", path=str(index_path))
            problems = []
            if "metadata" in index and not isinstance(index["metadata"], (dict, type(None))):
                problems.append(f"metadata must be an object, found {index['metadata']!r:.40}")
            shards = sorted({s for s in weight_map.values() if isinstance(s, str)})
            for name, shard in weight_map.items():
                if not isinstance(shard, str):
                    problems.append(f"weight_map[{name!r}] must be a shard file name, found {shard!r:.40}")
            for shard in shards:
                n = sum(1 for s in weight_map.values() if s == shard)
                if not _plain_name(shard):
                    problems.append(f"shard name {shard!r} is not a plain file name in the checkpoint directory; refused")
                elif (root / shard).is_symlink() and not (root / shard).exists():
                    problems.append(f"shard {shard} is a link to {os.readlink(root / shard)}, which is missing "
                                    f"(holds {n} tensors; an interrupted download?)")
                elif not (root / shard).is_file():
                    problems.append(f"missing shard {shard} (holds {n} tensors)")
            if problems:
                raise CheckpointError("broken shard index", problems=_cap(problems), path=str(index_path))
            files = [root / s for s in shards]
        elif (root / SINGLE_NAME).is_file():
            weight_map, files = None, [root / SINGLE_NAME]
        elif (root / SINGLE_NAME).is_symlink():
            raise CheckpointError(f"{SINGLE_NAME} is a link to {os.readlink(root / SINGLE_NAME)}, which is missing "
                                  "(an interrupted download?)", path=str(root))
        else:
            stray = sorted(p.name for p in root.glob("*.safetensors") if p.name not in SIDECAR_FILES)
            if stray:
                raise CheckpointError(
                    f"found {', '.join(stray[:3])} but no {INDEX_NAME} saying which tensor is where", path=str(root)
                )
            return {}
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            header, data_start = read_header(file)
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if weight_map is not None and weight_map.get(name) != file.name:
                    continue  # the index is the authority on where a tensor lives
                tensors[name] = TensorInfo(
                    name, file, meta["dtype"], tuple(meta["shape"]), tuple(meta["data_offsets"]), data_start
                )
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
        """Every difference between the tensors on disk and what config.json (and, for a quantized
        checkpoint, its quantized layout) implies."""
        problems: list[str] = []
        if self.quant is None:
            expected = {name: (None, shape) for name, shape in self.arch.tensor_shapes().items()}
        else:
            expected, problems = expected_tensors(self.quant, self.arch.tensor_shapes())
        for name, (dtype, shape) in expected.items():
            info = self.tensors.get(name)
            what = f"{self.quant.quant_algo} layout" if dtype is not None else "config"
            if info is None and dtype is not None and name.rsplit(".", 1)[1] in OPTIONAL:
                continue
            if info is None:
                problems.append(f"missing tensor {name} {list(shape)}"
                                + (f" ({self.quant.quant_algo} layout)" if dtype is not None else ""))
            elif info.shape != shape:
                problems.append(f"{name}: {what} implies shape {list(shape)}, {info.file.name} has {list(info.shape)}")
            elif dtype is None and info.dtype not in FLOAT_DTYPES:
                problems.append(f"{name} is {info.dtype_name} in {info.file.name}; model weights are floating point")
            elif dtype is None and self.quant is not None and info.dtype.startswith("F8"):
                problems.append(f"{name} is {info.dtype_name} in {info.file.name}, but {self.quant.quant_algo} leaves "
                                "it unquantized (an fp8 tensor without scales)")
            elif dtype is not None and info.dtype not in ((dtype,) if isinstance(dtype, str) else dtype):
                want = dtype if isinstance(dtype, str) else " or ".join(dtype)
                problems.append(f"{name} is {info.dtype} in {info.file.name}; the {self.quant.quant_algo} layout "
                                f"stores it as {want}")
        layout = "config.json's layout" + (f" or the {self.quant.quant_algo} layout" if self.quant else "")
        for name in self.tensors:
            if name not in expected and not name.startswith(IGNORED_PREFIXES):
                problems.append(f"unexpected tensor {name} in {self.tensors[name].file.name} (not in {layout})")
        return problems

    def require_weights(self) -> None:
        """Raise CheckpointError when only config.json (and sidecars) are here."""
        if not self.tensors:
            raise CheckpointError(f"no weights: expected {SINGLE_NAME} or {INDEX_NAME} beside config.json "
                                  "(it holds config.json only: planning works without the weights, slicing "
                                  "and exporting do not)", path=str(self.root))

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

    # ---- reading data ----------------------------------------------------------------------
    def _fd(self, file: Path) -> int:
        """One descriptor per shard, kept open: the kernel's read-ahead follows sequential reads
        only within one open file."""
        fds = self.__dict__.setdefault("_fds", {})
        if file not in fds:
            fds[file] = os.open(file, os.O_RDONLY)
        return fds[file]

    def close(self) -> None:
        for fd in self.__dict__.pop("_fds", {}).values():
            os.close(fd)

    def __del__(self) -> None:
        self.close()

    def read(self, name: str, rows: tuple[int, int] | None = None):
        """Read one tensor, or rows ``[r0, r1)`` of its first axis, with plain file reads.

        No memory map: a file truncated or replaced while we read gives a clear error, not a
        crash (a mapped page past the end of a file kills the process with SIGBUS).

        Returns:
            a CPU ``torch.Tensor`` in the dtype on disk, owning its memory.
        """
        import torch

        info = self.tensors[name]
        dtype = getattr(torch, DTYPES[info.dtype][0])
        buf, shape = self._read_bytes(name, rows)
        if buf.size == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.from_numpy(buf).view(dtype).view(shape)

    def read_bits(self, name: str, rows: tuple[int, int] | None = None):
        """Like :meth:`read`, without torch: the raw bits of one tensor (or of rows ``[r0, r1)``).

        For copying and cutting out elements, which never look at their values: bfloat16 and
        float8 have no numpy dtype, so every element is viewed as an unsigned integer of its size.

        Returns:
            a numpy array of dtype :func:`~elastic.slicer.formats.safetensors.bits_dtype` of the
            tensor's dtype code (``self.tensors[name].dtype``; "BF16" -> uint16), shaped like the
            tensor (``r1 - r0`` rows), owning its memory.

        Example:
            >>> ckpt.read_bits("backbone.layers.0.mixer.in_proj.weight", (0, 4)).dtype
            dtype('uint16')
        """
        buf, shape = self._read_bytes(name, rows)
        return buf.view(bits_dtype(self.tensors[name].dtype)).reshape(shape)

    def _read_bytes(self, name: str, rows: tuple[int, int] | None):
        """(uint8 numpy buffer holding rows ``[r0, r1)`` of ``name`` as on disk, their shape)."""
        import numpy as np

        info = self.tensors[name]
        r0, r1 = rows if rows is not None else (0, info.shape[0] if info.shape else 1)
        nbytes = (r1 - r0) * info.row_bytes
        shape = (r1 - r0, *info.shape[1:]) if info.shape else ()
        buf = np.empty(nbytes, dtype=np.uint8)  # not zero-filled: the read overwrites it
        if nbytes == 0:
            return buf, shape
        try:
            got = _pread_fully(self._fd(info.file), buf, info.data_start + info.offsets[0] + r0 * info.row_bytes)
        except OSError as e:
            raise CheckpointError(f"cannot read {name} ({e.strerror})", path=str(info.file)) from None
        if got != nbytes:
            raise CheckpointError(
                f"truncated while reading {name}: the file ended {nbytes - got} bytes early "
                "(was it modified during the run?)", path=str(info.file)
            )
        return buf, shape

    def iter_tensors(self, names: list[str] | None = None) -> Iterator[tuple[str, Any]]:
        """Yield (name, tensor) one at a time, in file order."""
        wanted = names if names is not None else list(self.tensors)
        for name in sorted(wanted, key=lambda n: (self.tensors[n].file, self.tensors[n].offsets)):
            yield name, self.read(name)


def _pread_fully(fd: int, view, offset: int) -> int:
    """pread until the buffer is full or the file ends (reads may return short)."""
    mv, got = memoryview(view), 0
    while got < len(mv):
        n = os.preadv(fd, [mv[got:]], offset + got)
        if not n:
            break
        got += n
    return got
