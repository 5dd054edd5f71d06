"""How a checkpoint's tensors are split into files, which rank writes each, and how a rank reads its slices.

A checkpoint's weights are one ``model.safetensors`` while they fit in one shard
(``train.checkpoint_shard_mb``, 5,000 MB by default, as transformers' ``max_shard_size``); above it
they are ``model-00001-of-0000n.safetensors`` ... plus ``model.safetensors.index.json``, the index
transformers writes and reads (``{"metadata": {"total_size": bytes}, "weight_map": {name: file}}``),
so ``AutoModelForCausalLM.from_pretrained`` loads the folder as it is. The optimizer state is split
the same way by its keys (``exp_avg/<parameter name>``, ...): ``optimizer.safetensors`` or
``optimizer-0000k-of-0000n.safetensors`` plus ``optimizer.safetensors.index.json``.

The split depends only on the tensors' names and sizes, in the model's parameter order (packed
greedily, a new file when the next tensor would overflow the shard), never on the world size; the
files are then dealt to ranks round-robin (model files first, then optimizer files): file j is
written and hashed by rank ``j % world``. So a checkpoint's bytes are the same whatever the number
of ranks that wrote it, and any number of ranks can read it back: each reads only the slices of
each tensor it holds (:class:`SliceReader`, through ``safetensors.safe_open(...).get_slice``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from llm360.errors import CheckpointError
from llm360.rundir import atomic
from llm360.rundir.layout import MODEL_FILE, MODEL_INDEX, OPTIMIZER_FILE, OPTIMIZER_INDEX

MB = 10**6
"""``train.checkpoint_shard_mb``'s unit (transformers' ``max_shard_size="5GB"`` is 5e9 bytes)."""
DEFAULT_SHARD_BYTES = 5000 * MB
"""transformers' default ``max_shard_size``, and ``train.checkpoint_shard_mb``'s."""


def shard_file_names(single: str, n: int) -> list[str]:
    """``[single]`` for one file, else ``<stem>-00001-of-0000n.safetensors`` ... (transformers' names)."""
    if n == 1:
        return [single]
    stem = single.removesuffix(".safetensors")
    return [f"{stem}-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]


def pack(sizes: Iterable[tuple[str, int]], shard_bytes: int) -> list[list[str]]:
    """Names grouped into files in the given order: a new file when the next would pass ``shard_bytes``.

    A tensor larger than a shard gets a file of its own. Always at least one (possibly empty) group.
    """
    groups: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if groups[-1] and used + nbytes > shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += nbytes
    return groups


def _writer(j: int, world: int) -> int:
    """The rank of ``world`` that writes and hashes file ``j`` of a layout: round-robin."""
    return j % world


@dataclass(frozen=True)
class ShardLayout:
    """The files of one checkpoint's tensors: ``(file name, tensor names)`` for the model and the optimizer."""

    model: tuple[tuple[str, tuple[str, ...]], ...]
    optimizer: tuple[tuple[str, tuple[str, ...]], ...]

    @classmethod
    def plan(
        cls, model_sizes: Sequence[tuple[str, int]], optimizer_sizes: Sequence[tuple[str, int]], shard_bytes: int
    ) -> ShardLayout:
        """The layout for tensors given as ``(name, bytes)`` in the order they are packed in."""
        if shard_bytes < 1:
            raise ValueError(f"shard_bytes must be >= 1, got {shard_bytes}")

        def files(single: str, sizes: Sequence[tuple[str, int]]) -> tuple[tuple[str, tuple[str, ...]], ...]:
            groups = pack(sizes, shard_bytes)
            return tuple(zip(shard_file_names(single, len(groups)), map(tuple, groups), strict=True))

        return cls(files(MODEL_FILE, model_sizes), files(OPTIMIZER_FILE, optimizer_sizes))

    @property
    def files(self) -> list[str]:
        """Every tensor file, in the order they are dealt to ranks."""
        return [f for f, _ in self.model] + [f for f, _ in self.optimizer]

    def files_of(self, rank: int, world: int) -> list[str]:
        """The tensor files rank ``rank`` of ``world`` writes."""
        return [f for j, f in enumerate(self.files) if _writer(j, world) == rank]

    def owners(self, world: int) -> dict[str, int]:
        """The rank of ``world`` that writes each tensor: the one its file is dealt to (:meth:`files_of`)."""
        return {n: _writer(j, world) for j, (_, names) in enumerate((*self.model, *self.optimizer)) for n in names}

    def names_in(self, file: str) -> tuple[str, ...]:
        for f, names in (*self.model, *self.optimizer):
            if f == file:
                return names
        raise KeyError(file)

    def index_files(self, sizes: Mapping[str, int]) -> dict[str, bytes]:
        """The ``*.safetensors.index.json`` files of the parts split in several files (none for one file).

        ``sizes``: bytes of every tensor by name (the index's ``metadata.total_size``).
        """
        out: dict[str, bytes] = {}
        for index, part in ((MODEL_INDEX, self.model), (OPTIMIZER_INDEX, self.optimizer)):
            if len(part) > 1:
                weight_map = {name: f for f, names in part for name in names}
                total = sum(sizes[n] for n in weight_map)
                out[index] = atomic.json_bytes({"metadata": {"total_size": total}, "weight_map": weight_map})
        return out


def tensor_bytes(t: Tensor) -> int:
    """Bytes a tensor takes in a safetensors file (its global size, for a DTensor)."""
    return t.numel() * t.element_size()


def tensor_files(
    listed: Iterable[str], folder: Path, single: str, index: str, *, check_listed: bool = True
) -> dict[str, str]:
    """``{tensor name: file}`` of one part of a checkpoint (the model's or the optimizer's), from its index.

    ``listed``: the file names the checkpoint's marker lists. A part that is one file has no index:
    its names are read from that file's header. Raises CheckpointError naming the file at fault.
    """
    from llm360.rundir.tensorio import read_header

    listed = set(listed)
    if index in listed:
        try:
            obj = json.loads((folder / index).read_bytes())
            weight_map = obj["weight_map"]
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
            ):
                raise ValueError("'weight_map' is not an object of names to files")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{folder / index} is unreadable: {e}") from None
        absent = sorted(set(weight_map.values()) - listed)
        if absent and check_listed:
            raise CheckpointError(
                f"{folder / index} names {', '.join(absent)}, which the checkpoint does not list; it is incomplete"
            )
        return dict(weight_map)
    if single not in listed:
        raise CheckpointError(f"checkpoint {folder} has neither {single} nor {index}")
    return {name: single for name in read_header(folder / single) if name != "__metadata__"}


def part_files(listed: Iterable[str], folder: Path, single: str, index: str) -> list[str]:
    """The files of one part of a checkpoint (the index included when it has one), sorted."""
    listed = set(listed)
    if index in listed:
        return sorted({*tensor_files(listed, folder, single, index).values(), index})
    return [single] if single in listed else []


def part_paths(folder: Path, part: str = "model") -> list[Path]:
    """The tensor files of a part (``"model"`` or ``"optimizer"``) as the folder holds them, marker or not.

    For readers of folders that may be incomplete (the report): the index's files when there is an
    index, else the single file, else none. Raises CheckpointError for an unreadable index.
    """
    single, index = (MODEL_FILE, MODEL_INDEX) if part == "model" else (OPTIMIZER_FILE, OPTIMIZER_INDEX)
    folder = Path(folder)
    if (folder / index).is_file():
        return [folder / f for f in sorted(set(tensor_files([index, single], folder, single, index,
                                                           check_listed=False).values()))]
    return [folder / single] if (folder / single).is_file() else []


class SliceReader:
    """Reads single tensors, or slices of them, from a checkpoint part's files (memory-mapped).

    ``weight_map`` is :func:`tensor_files`' ``{name: file}``. Nothing is hashed here: verify the
    files first (:func:`llm360.rundir.checkpoint.verify_checkpoint`). Use as a context manager.
    """

    def __init__(self, folder: Path, weight_map: Mapping[str, str]) -> None:
        self.folder = Path(folder)
        self.weight_map = dict(weight_map)
        self._open: dict[str, Any] = {}

    def __enter__(self) -> SliceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._open.clear()

    def _handle(self, file: str) -> Any:
        from safetensors import SafetensorError, safe_open

        if file not in self._open:
            try:
                self._open[file] = safe_open(str(self.folder / file), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{self.folder / file}: cannot open safetensors file ({e})") from None
        return self._open[file]

    def shape(self, name: str) -> list[int]:
        return list(self._handle(self._file(name)).get_slice(name).get_shape())

    def read(self, name: str, offsets: Sequence[int] | None = None, shape: Sequence[int] | None = None) -> Tensor:
        """Tensor ``name`` whole, or the block of ``shape`` starting at ``offsets`` (one per dimension)."""
        sl = self._handle(self._file(name)).get_slice(name)
        if offsets is None or shape is None or len(shape) == 0:
            return sl[:] if len(sl.get_shape()) else self._handle(self._file(name)).get_tensor(name)
        return sl[tuple(slice(o, o + n) for o, n in zip(offsets, shape, strict=True))]

    def _file(self, name: str) -> str:
        try:
            return self.weight_map[name]
        except KeyError:
            raise CheckpointError(f"checkpoint {self.folder} has no tensor {name!r}") from None
