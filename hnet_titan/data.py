"""Byte-level training data: sources -> documents -> packed, sharded, resumable micro-batches.

A source spec is a file, a directory (recursive, sorted, hidden entries skipped), a glob, or
``hf:NAME[:split]`` (a Hugging Face dataset, streamed). Plain files hold one document each (their
raw bytes), ``.jsonl`` files one per line and ``.parquet`` files one per row (UTF-8 encoded). Records (files, lines, rows)
are dealt round-robin over data-parallel ranks x dataloader workers by their index in the
epoch's record stream, so the shards partition the corpus and no shard opens another shard's
whole-file documents. Micro-batches are resumed exactly through ``StatefulDataLoader``.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import json
import logging
import os
import random
import sysconfig
from collections.abc import Collection, Generator, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from hnet.tokenizer import BOS, EOS

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of padding positions
_GLOB_CHARS = "*?["
_KINDS = {".jsonl": "jsonl", ".parquet": "parquet"}  # any other extension: one plain-text document
_RESUME_HINT = "resume without the dataloader state (--checkpoint.exclude_from_loading dataloader)"

# A reader yields (record index, raw text value) for records first, first + step, ... of a file
# and returns the file's record count, which places the next file's records in the epoch.
_Reader = Generator[tuple[int, Any], None, int]


class DataError(ValueError):
    """A data source, option or dataloader state that cannot be used as given."""


@dataclass(frozen=True)
class SourceFile:
    """One file (or streamed dataset) of the corpus; `name` is location-free, for document keys."""

    path: str
    name: str
    kind: str  # "text" | "jsonl" | "parquet" | "hf"


class Document(NamedTuple):
    """A document's key (stable across machines: the split hashes it) and its bytes."""

    key: str
    data: bytes


# ---------------------------------------------------------------- sources


def resolve_sources(sources: Sequence[str]) -> list[SourceFile]:
    """The corpus files of `sources` in stream order; the standard library's .py files if empty."""
    if not sources:
        stdlib = sysconfig.get_paths()["stdlib"]
        return _named(_files_under(stdlib, ".py", {"site-packages", "dist-packages"}), stdlib)
    return [file for spec in sources for file in _resolve(spec)]


def _resolve(spec: str) -> list[SourceFile]:
    if spec.startswith("hf:"):
        _require("datasets", spec)
        name, _, split = spec[3:].partition(":")
        spec = f"hf:{name}:{split or 'train'}"
        return [SourceFile(spec, spec, "hf")]
    if any(c in spec for c in _GLOB_CHARS):
        root = _glob_root(spec)
        paths = [p for match in glob.glob(spec, recursive=True) for p in _files_under(match)]
    elif os.path.exists(spec):
        root = spec if os.path.isdir(spec) else os.path.dirname(spec) or "."
        paths = _files_under(spec)
    else:
        raise DataError(f"data source not found: {spec}")
    if not paths:
        raise DataError(f"data source matches no files: {spec}")
    files = _named(paths, root)
    if any(file.kind == "parquet" for file in files):
        _require("pyarrow", spec)
    return files


def _files_under(path: str, suffix: str = "", skip_dirs: Collection[str] = ()) -> list[str]:
    """`path` if it is a file, else the files below it that end in `suffix`."""
    if os.path.isfile(path):
        return [path]
    found = []
    for parent, dirs, names in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in skip_dirs]
        found += [os.path.join(parent, n) for n in names if not n.startswith(".") and n.endswith(suffix)]
    return found


def _glob_root(pattern: str) -> str:
    """The directory a glob's matches are named relative to: its parts before the first wildcard."""
    parts = Path(pattern).parts
    plain = next(i for i, part in enumerate([*parts, "*"]) if any(c in part for c in _GLOB_CHARS))
    return str(Path(*parts[:plain])) if plain else "."


def _named(paths: list[str], root: str) -> list[SourceFile]:
    """Files for `paths` (duplicates dropped), named by path relative to `root`, sorted by name."""
    by_name = {Path(os.path.relpath(p, root)).as_posix(): p for p in paths}
    return [SourceFile(by_name[n], n, _KINDS.get(os.path.splitext(n)[1], "text")) for n in sorted(by_name)]


def _require(module: str, spec: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError:
        raise DataError(f"data source {spec!r} needs the `{module}` package: pip install {module}") from None


# ---------------------------------------------------------------- readers


def _read_text(file: SourceFile, field: str, first: int, step: int) -> _Reader:
    if first == 0:
        with open(file.path, "rb") as f:
            yield 0, f.read()
    return 1


def _read_jsonl(file: SourceFile, field: str, first: int, step: int) -> _Reader:
    want, count = first, 0
    with open(file.path, "rb") as f:
        for count, line in enumerate(f, 1):
            if count - 1 != want:
                continue  # another shard's line: not even parsed
            want += step
            if line.strip():  # blank lines hold no record
                yield count - 1, _json_field(line, field, f"{file.path}:{count}")
    return count


def _json_field(line: bytes, field: str, where: str) -> Any:
    try:
        record = json.loads(line)
    except ValueError as e:
        raise DataError(f"{where}: invalid JSON: {e}") from None
    return record.get(field) if isinstance(record, dict) else None


def _read_parquet(file: SourceFile, field: str, first: int, step: int) -> _Reader:
    with _reading_parquet(file.path):
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(file.path)
    if field not in parquet.schema_arrow.names:
        names = parquet.schema_arrow.names
        raise DataError(f"parquet file {file.path} has no column {field!r} (it has {names})")
    start = 0
    for group in range(parquet.num_row_groups):
        end = start + parquet.metadata.row_group(group).num_rows
        rows = range(first + max(0, -(-(start - first) // step)) * step, end, step)
        if rows:  # read only row groups with rows of this shard, one at a time
            with _reading_parquet(file.path):
                column = parquet.read_row_group(group, columns=[field]).column(0)
                values = column.take([row - start for row in rows]).to_pylist()
            yield from zip(rows, values)
        start = end
    return start


@contextmanager
def _reading_parquet(path: str) -> Iterator[None]:
    import pyarrow as pa

    try:
        yield
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read parquet file {path}: {e}") from e


def _read_hf(file: SourceFile, field: str, first: int, step: int) -> _Reader:
    import datasets

    _, name, split = file.path.split(":", 2)
    want, count = first, 0
    for count, row in enumerate(datasets.load_dataset(name, split=split, streaming=True), 1):
        if count - 1 == want:
            want += step
            yield count - 1, row.get(field)
    return count


_READERS = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet, "hf": _read_hf}


def _key(file: SourceFile, index: int) -> str:
    if file.kind == "text":
        return file.name
    return f"{file.name}:{index + 1 if file.kind == 'jsonl' else index}"  # jsonl: 1-based line


def _where(file: SourceFile, index: int) -> str:
    return f"{file.path}:{index + 1}" if file.kind == "jsonl" else f"{file.path} row {index}"


@dataclass(frozen=True)
class _Position:
    """The next pair to pack: `offset` pairs into record `record` of the epoch's `file_index`-th file."""

    epoch: int = 0
    file_index: int = 0
    record: int = 0
    records_before: int = 0  # the epoch's records in earlier files: places this file's in the dealing
    offset: int = 0


class _EpochWalk:
    """One shard's records of one epoch from a position on; its attributes say where it stands.

    Iterating yields (record index in `file`, document bytes or None for a skipped record).
    """

    def __init__(
        self,
        files: Sequence[SourceFile],
        shard: int,
        num_shards: int,
        text_field: str,
        missing_field: str,
        start: _Position = _Position(),
    ) -> None:
        self.files, self.shard, self.num_shards = files, shard, num_shards
        self.text_field, self.missing_field = text_field, missing_field
        self.file_index, self.record = start.file_index, start.record
        self.records_before = start.records_before

    def __iter__(self) -> Iterator[tuple[int, bytes | None]]:
        while self.file_index < len(self.files):
            self.file = self.files[self.file_index]
            # First record at or after self.record whose epoch-wide index falls to this shard.
            first = self.record + (self.shard - self.records_before - self.record) % self.num_shards
            read = _READERS[self.file.kind](self.file, self.text_field, first, self.num_shards)
            while True:
                try:
                    index, value = next(read)
                except StopIteration as end:  # the reader returns the file's record count
                    self.records_before += end.value
                    break
                yield index, self._bytes(index, value)
            self.file_index, self.record = self.file_index + 1, 0

    def _bytes(self, index: int, value: Any) -> bytes | None:
        if isinstance(value, bytes):
            return value
        if isinstance(value, str):
            return value.encode("utf-8", "replace")  # "replace": a lone surrogate must not stop training
        where = _where(self.file, index)
        if value is not None:
            raise DataError(f"{where}: field {self.text_field!r} holds {type(value).__name__}, not text")
        if self.missing_field == "error":
            raise DataError(f"{where}: no field {self.text_field!r} (missing_field='skip' skips it)")
        return None


def iter_documents(
    sources: Sequence[str], *, text_field: str = "text", missing_field: str = "skip"
) -> Iterator[Document]:
    """Every document of `sources` once, in stream order, unsharded and unsplit: the reference corpus."""
    walk = _EpochWalk(resolve_sources(sources), 0, 1, text_field, missing_field)
    for index, data in walk:
        if data is not None:
            yield Document(_key(walk.file, index), data)


def in_validation(key: str, val_fraction: float) -> bool:
    """Whether a document belongs to the validation split: a stable hash of its key, not Python's."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < val_fraction * 2**64


# ---------------------------------------------------------------- packing


def _tokens(data: bytes, add_eos: bool) -> np.ndarray:
    tokens = np.empty(len(data) + 1 + add_eos, dtype=np.int64)
    tokens[0] = BOS
    tokens[1 : len(data) + 1] = np.frombuffer(data, dtype=np.uint8)
    if add_eos:
        tokens[-1] = EOS
    return tokens


class _Packer:
    """Fills `rows` rows of `seq_len` (input, label) positions; rows and document pieces are segments."""

    def __init__(self, seq_len: int, rows: int) -> None:
        self.seq_len, self.size = seq_len, seq_len * rows
        self._start()

    def _start(self) -> None:
        self.inputs = np.zeros(self.size, dtype=np.int64)
        self.labels = np.full(self.size, IGNORE_INDEX, dtype=np.int64)
        self.bounds, self.fill = [0], 0

    @property
    def full(self) -> bool:
        return self.fill == self.size

    def add(self, tokens: np.ndarray, done: int) -> int:
        """Pack the document's pairs from pair `done` into the current row; return the pairs now done."""
        n = min(len(tokens) - 1 - done, self.seq_len - self.fill % self.seq_len)
        self.inputs[self.fill : self.fill + n] = tokens[done : done + n]
        self.labels[self.fill : self.fill + n] = tokens[done + 1 : done + 1 + n]
        self.fill += n
        self.bounds.append(self.fill)
        return done + n

    def emit(self) -> dict[str, Any]:
        """Hand out the micro-batch, padding what is left (one segment per row) and starting anew."""
        predicted = self.fill
        while self.fill < self.size:
            self.fill += self.seq_len - self.fill % self.seq_len
            self.bounds.append(self.fill)
        cu_seqlens = torch.tensor(self.bounds, dtype=torch.int32)
        batch = {
            "input_ids": torch.from_numpy(self.inputs),
            "labels": torch.from_numpy(self.labels),
            "cu_seqlens": cu_seqlens,
            "max_seqlen": int((cu_seqlens[1:] - cu_seqlens[:-1]).max()),
            "num_predicted": predicted,
        }
        self._start()
        return batch


# ---------------------------------------------------------------- dataset and loader


def _layout(dp_rank: int, dp_world_size: int, num_workers: int) -> dict[str, int]:
    return {"dp_rank": dp_rank, "dp_world_size": dp_world_size, "num_workers": num_workers}


def _check_layout(saved: Mapping[str, Any], current: dict[str, int]) -> None:
    """Refuse a state from another layout: its positions belong to other shards."""
    saved = {k: saved.get(k) for k in current}
    if saved != current:
        show = lambda layout: ", ".join(f"{k}={v}" for k, v in layout.items())  # noqa: E731
        raise DataError(
            f"the dataloader state was saved with {show(saved)} but this run has {show(current)}; "
            f"the data shards differ, so {_RESUME_HINT}"
        )


class PackedByteDataset(IterableDataset):
    """One data-parallel rank's micro-batches of packed byte documents, resumable via state_dict().

    Each worker of the dataloader takes its own shard (rank x worker). A fresh iteration starts
    at epoch 0; one right after load_state_dict() continues from the loaded state.
    """

    def __init__(
        self,
        sources: Sequence[str] = (),
        *,
        seq_len: int,
        local_batch_size: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        split: str = "train",
        infinite: bool | None = None,
        text_field: str = "text",
        missing_field: str = "skip",
        add_eos: bool = True,
        val_fraction: float = 0.0,
        shuffle_files: bool = False,
        seed: int = 0,
    ) -> None:
        if seq_len < 1 or local_batch_size < 1:
            raise DataError(f"seq_len ({seq_len}) and local_batch_size ({local_batch_size}) must be positive")
        if not 0 <= dp_rank < dp_world_size:
            raise DataError(f"dp_rank {dp_rank} is not in a data-parallel world of {dp_world_size}")
        if split not in ("train", "val", "all"):
            raise DataError(f"split must be 'train', 'val' or 'all', not {split!r}")
        if missing_field not in ("skip", "error"):
            raise DataError(f"missing_field must be 'skip' or 'error', not {missing_field!r}")
        if not 0.0 <= val_fraction <= 1.0:
            raise DataError(f"val_fraction must be in [0, 1], not {val_fraction}")
        self.sources, self.files = list(sources), resolve_sources(sources)
        self.seq_len, self.local_batch_size = seq_len, local_batch_size
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.split, self.val_fraction = split, val_fraction
        self.infinite = split == "train" if infinite is None else infinite
        self.text_field, self.missing_field, self.add_eos = text_field, missing_field, add_eos
        self.shuffle_files, self.seed = shuffle_files, seed
        self._restart()

    def _restart(self) -> None:
        self._position, self.num_batches, self.num_skipped = _Position(), 0, 0
        self._resuming = False

    def state_dict(self) -> dict[str, Any]:
        """Plain values that describe the stream after the last micro-batch handed out."""
        counters = {"num_batches": self.num_batches, "num_skipped": self.num_skipped}
        return {**asdict(self._position), **counters, **self._layout()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        _check_layout(state_dict, self._layout())
        self._position = _Position(**{f.name: state_dict[f.name] for f in fields(_Position)})
        self.num_batches, self.num_skipped = state_dict["num_batches"], state_dict["num_skipped"]
        self._resuming = True

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self._resuming:
            self._restart()
        self._resuming = False
        return self._batches()

    def _layout(self) -> dict[str, int]:
        info = get_worker_info()
        return _layout(self.dp_rank, self.dp_world_size, info.num_workers if info else 0)

    def _shard(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.dp_rank * workers + worker, self.dp_world_size * workers

    def _epoch_files(self, epoch: int) -> list[SourceFile]:
        files = list(self.files)
        if self.shuffle_files:  # the same order on every rank and worker
            random.Random(f"{self.seed}:{epoch}").shuffle(files)
        return files

    def _described(self) -> str:
        return ", ".join(self.sources) or "<python stdlib>"

    def _selected(self, file: SourceFile, index: int) -> bool:
        if self.split == "all":
            return True
        return in_validation(_key(file, index), self.val_fraction) == (self.split == "val")

    def _batches(self) -> Iterator[dict[str, Any]]:
        shard, num_shards = self._shard()
        packer = _Packer(self.seq_len, self.local_batch_size)
        start = self._position
        while True:
            files = self._epoch_files(start.epoch)
            walk = _EpochWalk(files, shard, num_shards, self.text_field, self.missing_field, start)
            done = start.offset  # > 0 only when the walk's first record is a document partly packed
            packed_any = False
            for index, data in walk:
                if data is None:
                    if self.num_skipped == 0:
                        where = _where(walk.file, index)
                        logger.warning("skipping records without field %r, first %s", self.text_field, where)
                    self.num_skipped += 1
                    continue
                if not self._selected(walk.file, index):
                    continue
                tokens = _tokens(data, self.add_eos)
                while done < len(tokens) - 1:
                    done = packer.add(tokens, done)
                    packed_any = True
                    if packer.full:
                        at = (walk.file_index, index, walk.records_before)
                        self._position = _Position(start.epoch, *at, done)
                        self.num_batches += 1
                        yield packer.emit()
                done = 0
            if walk.records_before == 0:
                raise DataError(f"no documents in data sources {self._described()}")
            if not self.infinite:
                self._position = _Position(start.epoch, len(files), 0, walk.records_before)
                if packer.fill:
                    self.num_batches += 1
                    yield packer.emit()
                return
            if not packed_any and start == _Position(start.epoch):
                raise DataError(
                    f"data shard {shard} of {num_shards} got no {self.split} tokens in a whole epoch of "
                    f"{self._described()}: use fewer ranks x workers, more data or another val_fraction"
                )
            start = _Position(start.epoch + 1)


class ByteDataLoader(StatefulDataLoader):
    """A StatefulDataLoader whose state names its data layout, so a mismatched resume fails early."""

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "layout": self._layout()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        if "layout" in state:
            _check_layout(state.pop("layout"), self._layout())
        super().load_state_dict(state)

    def _layout(self) -> dict[str, int]:
        return _layout(self.dataset.dp_rank, self.dataset.dp_world_size, self.num_workers)


def build_dataloader(sources: Sequence[str] = (), *, num_workers: int = 0, **options: Any) -> ByteDataLoader:
    """A resumable loader of packed micro-batches for one rank; ``options`` are PackedByteDataset's keywords.

    `infinite` defaults to split == 'train'; split='all' reads every document (explicit validation
    sources), 'train'/'val' split by key hash.
    """
    return ByteDataLoader(PackedByteDataset(sources, **options), batch_size=None, num_workers=num_workers)
