"""Tests of hnet_titan.data: sources, split, packing, sharding and exact resume (CPU, fast)."""

import itertools
import json
import pickle
import sys
import types

import pytest
import torch

from hnet_titan import data
from hnet_titan.data import (
    BOS,
    EOS,
    IGNORE_INDEX,
    DataError,
    PackedByteDataset,
    build_dataloader,
    in_validation,
    iter_documents,
    resolve_sources,
)

pytestmark = pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")

SEQ_LEN, ROWS = 64, 3

TEXTS = {
    "empty.txt": "",
    "one.txt": "x",
    "notes/row.md": "r" * 63,  # with BOS and EOS: exactly one row of pairs
    "notes/long.txt": "".join(f"line {i}: the quick brown fox\n" for i in range(40)),  # several batches
    "notes/deep/utf8.txt": "héllo wörld, 你好 " * 20,
    **{f"many/{i:02d}.txt": f"document number {i} " * (i % 5 + 1) for i in range(24)},
}
JSONL = [{"text": f"json record {i} " * (i % 3 + 1)} for i in range(8)]
JSONL.insert(3, {"title": "a record without text"})  # line 4
PARQUET_ROWS = [f"parquet row {i} " * (i % 4 + 1) for i in range(11)]


def has_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def write_parquet(path, columns: dict, row_group_size: int = 6) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small corpus directory and the documents it holds, keyed as the stream names them."""
    root = tmp_path_factory.mktemp("corpus")
    expected = {}
    for name, text in TEXTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
        expected[name] = text.encode()
    lines = [json.dumps(record) for record in JSONL]
    lines.insert(6, "")  # a blank line 7: no record, not an error
    (root / "records.jsonl").write_text("\n".join(lines) + "\n")
    for line, record in enumerate(lines, 1):
        if record and "text" in json.loads(record):
            expected[f"records.jsonl:{line}"] = json.loads(record)["text"].encode()
    if has_pyarrow():
        write_parquet(root / "table.parquet", {"text": PARQUET_ROWS})
        expected.update({f"table.parquet:{i}": row.encode() for i, row in enumerate(PARQUET_ROWS)})
    return str(root), expected


def loader(source, **overrides):
    options = dict(seq_len=SEQ_LEN, local_batch_size=ROWS, split="all", infinite=False)
    return build_dataloader([source], **{**options, **overrides})


def dataset(source, **overrides) -> PackedByteDataset:
    options = dict(seq_len=SEQ_LEN, local_batch_size=ROWS, split="all", infinite=False)
    return PackedByteDataset([source], **{**options, **overrides})


def take(batches, n: int) -> list[dict]:
    return list(itertools.islice(batches, n))


def check_batch(batch: dict, rows: int = ROWS) -> None:
    size = rows * SEQ_LEN
    inputs, labels, cu = batch["input_ids"], batch["labels"], batch["cu_seqlens"]
    assert inputs.dtype == labels.dtype == torch.long and cu.dtype == torch.int32
    assert inputs.shape == labels.shape == (size,)
    bounds = cu.tolist()
    assert bounds[0] == 0 and bounds[-1] == size
    assert all(a < b for a, b in zip(bounds, bounds[1:]))
    assert set(range(0, size, SEQ_LEN)) <= set(bounds), "every row starts a piece"
    assert batch["max_seqlen"] == max(b - a for a, b in zip(bounds, bounds[1:]))
    assert batch["num_predicted"] == int((labels != IGNORE_INDEX).sum())
    assert BOS not in labels.tolist(), "BOS is never predicted"
    for a, b in zip(bounds, bounds[1:]):
        ins, labs = inputs[a:b].tolist(), labels[a:b].tolist()
        if IGNORE_INDEX in labs:
            assert set(labs) == {IGNORE_INDEX} and set(ins) == {0}, "padding is a segment of its own"
        else:
            assert labs[:-1] == ins[1:], "labels are the next inputs within a piece"


def rebuild(batches: list[dict]) -> list[bytes]:
    """The documents of one shard's batch stream, checking continuity and padding on the way."""
    docs, expect, padded = [], None, False
    for batch in batches:
        check_batch(batch)
        inputs, labels, bounds = batch["input_ids"], batch["labels"], batch["cu_seqlens"].tolist()
        for a, b in zip(bounds, bounds[1:]):
            ins, labs = inputs[a:b].tolist(), labels[a:b].tolist()
            if labs[0] == IGNORE_INDEX:
                padded = True
                continue
            assert not padded, "padding only at the very end of the stream"
            if ins[0] == BOS:
                assert expect is None, "a document was cut short"
                docs.append([])
            else:
                assert ins[0] == expect, "a piece continues its document where the last one stopped"
            docs[-1] += labs
            expect = None if labs[-1] == EOS else labs[-1]
    assert expect is None
    return [bytes(doc[:-1]) for doc in docs]


def assert_same(batches: list[dict], reference: list[dict]) -> None:
    assert len(batches) == len(reference)
    for batch, ref in zip(batches, reference):
        assert batch.keys() == ref.keys()
        for key, value in batch.items():
            assert torch.equal(value, ref[key]) if torch.is_tensor(value) else value == ref[key]


def fake_workers(monkeypatch, worker: int, num_workers: int) -> None:
    """Make the dataset see itself as dataloader worker `worker` of `num_workers` (0: main process)."""
    info = types.SimpleNamespace(id=worker, num_workers=num_workers) if num_workers else None
    monkeypatch.setattr(data, "get_worker_info", lambda: info)


# ---------------------------------------------------------------- sources


def test_iter_documents_reads_every_format(corpus):
    root, expected = corpus
    documents = list(iter_documents([root]))
    assert dict(documents) == expected
    files = [key.split(":")[0] for key, _ in documents]
    assert files == sorted(files), "files stream in the order of their names"


def test_glob_and_file_specs_name_relative_to_their_root(corpus):
    root, _ = corpus
    files = resolve_sources([f"{root}/notes/**/*.txt", f"{root}/one.txt"])
    assert [f.name for f in files] == ["deep/utf8.txt", "long.txt", "one.txt"]
    assert {f.kind for f in files} == {"text"}


def test_stdlib_is_the_default_source():
    files = resolve_sources([])
    names = [f.name for f in files]
    assert len(files) > 100 and names == sorted(names)
    assert all(n.endswith(".py") for n in names) and not any("site-packages" in f.path for f in files)
    for batch in take(iter(build_dataloader([], seq_len=SEQ_LEN, local_batch_size=2)), 3):
        check_batch(batch, rows=2)


def test_missing_path_and_no_files(tmp_path):
    with pytest.raises(DataError, match="not found: .*nope"):
        resolve_sources([str(tmp_path / "nope")])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="matches no files: .*empty_dir"):
        resolve_sources([str(tmp_path / "empty_dir")])
    with pytest.raises(DataError, match=r"matches no files: .*\*\.xyz"):
        resolve_sources([str(tmp_path / "*.xyz")])


@pytest.mark.parametrize("infinite", [False, True])
def test_empty_source(tmp_path, infinite):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no documents"):
        next(iter(loader(str(tmp_path), infinite=infinite)))


def test_jsonl_missing_field(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"text": "a"}\n{"body": "b"}\n{"text": "c"}\n')
    with pytest.raises(DataError, match=r"records.jsonl:2: no field 'text'"):
        list(loader(str(path), missing_field="error"))
    records = dataset(str(path))
    assert rebuild(list(records)) == [b"a", b"c"]
    assert records.state_dict()["num_skipped"] == 1
    assert [d.data for d in iter_documents([str(path)], text_field="body")] == [b"b"]


def test_jsonl_invalid_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        list(iter_documents([str(path)]))


@pytest.mark.skipif(not has_pyarrow(), reason="pyarrow is optional")
def test_parquet_errors(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match="cannot read parquet file .*bad.parquet"):
        list(loader(str(tmp_path / "bad.parquet")))
    write_parquet(tmp_path / "body.parquet", {"body": ["a", "b"]})
    with pytest.raises(DataError, match="body.parquet has no column 'text'"):
        list(loader(str(tmp_path / "body.parquet")))
    body = iter_documents([str(tmp_path / "body.parquet")], text_field="body")
    assert [d.data for d in body] == [b"a", b"b"]


def test_hf_source_needs_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="pip install datasets"):
        resolve_sources(["hf:someone/corpus"])


def test_hf_source_streams_rows(monkeypatch):
    calls = []

    def load_dataset(name, split, streaming):
        calls.append((name, split, streaming))
        return iter([{"text": "first"}, {"other": 1}, {"text": "third"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    documents = list(iter_documents(["hf:someone/corpus:validation"]))
    key = "hf:someone/corpus:validation"
    assert documents == [(f"{key}:0", b"first"), (f"{key}:2", b"third")]
    assert calls == [("someone/corpus", "validation", True)]


# ---------------------------------------------------------------- packing and split


def test_packing_covers_every_byte_once(corpus):
    root, expected = corpus
    batches = list(loader(root))
    assert len(batches) > 3
    assert sorted(rebuild(batches)) == sorted(expected.values())
    assert IGNORE_INDEX not in torch.cat([b["labels"] for b in batches[:-1]]).tolist()
    assert_same(list(loader(root)), batches)  # a finite loader starts over on every pass


def test_without_eos_every_byte_after_bos_is_predicted(tmp_path):
    (tmp_path / "a.txt").write_text("abc")
    (tmp_path / "b.txt").write_text("")  # no pairs at all
    (batch,) = list(loader(str(tmp_path), add_eos=False))
    check_batch(batch)
    assert batch["input_ids"][:3].tolist() == [BOS, *b"ab"]
    assert batch["labels"][:3].tolist() == list(b"abc")
    assert batch["num_predicted"] == 3 and batch["cu_seqlens"].tolist()[:3] == [0, 3, SEQ_LEN]


def test_train_val_split_is_disjoint_and_deterministic(corpus):
    root, expected = corpus

    def documents(split, world=1):
        return sorted(
            doc
            for rank in range(world)
            for doc in rebuild(
                list(loader(root, split=split, val_fraction=0.3, dp_rank=rank, dp_world_size=world))
            )
        )

    train, val = documents("train"), documents("val")
    assert train and val and not set(train) & set(val)
    assert sorted(train + val) == sorted(expected.values())
    assert val == sorted(data for key, data in expected.items() if in_validation(key, 0.3))
    assert train == documents("train") and val == documents("val", world=2)


# ---------------------------------------------------------------- sharding


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_shards_partition_the_corpus(corpus, monkeypatch, world, num_workers):
    root, expected = corpus
    opened = []
    spy = lambda path, *args: opened.append(path) or open(path, *args)  # noqa: E731
    monkeypatch.setattr(data, "open", spy, raising=False)
    documents = []
    for rank, worker in itertools.product(range(world), range(max(num_workers, 1))):
        fake_workers(monkeypatch, worker, num_workers)
        documents += rebuild(list(dataset(root, dp_rank=rank, dp_world_size=world)))
    assert sorted(documents) == sorted(expected.values())
    text_files = [p for p in opened if not p.endswith(".jsonl")]
    assert len(text_files) == len({*text_files}) == len(TEXTS), "a whole file is opened by its shard only"


def test_records_are_dealt_round_robin_over_the_epoch(tmp_path, monkeypatch):
    names = [f"{i}.txt" for i in range(5)]
    for name in names:
        (tmp_path / name).write_text(f"file {name}")
    lines = [f"line {i}" for i in range(6)]
    (tmp_path / "z.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    stream = [f"file {name}".encode() for name in names] + [t.encode() for t in lines]
    for shard in range(4):  # dp rank 1 of 2 x worker 0 of 2 is shard 2 of 4
        rank, worker = divmod(shard, 2)
        fake_workers(monkeypatch, worker, 2)
        assert rebuild(list(dataset(str(tmp_path), dp_rank=rank, dp_world_size=2))) == stream[shard::4]


def test_shuffled_file_order_depends_on_epoch_not_rank(corpus):
    root, _ = corpus
    ranks = [dataset(root, dp_rank=r, dp_world_size=2, shuffle_files=True, seed=1) for r in range(2)]
    orders = [[[f.name for f in rank._epoch_files(epoch)] for epoch in range(2)] for rank in ranks]
    assert orders[0] == orders[1] and orders[0][0] != orders[0][1]
    assert sorted(orders[0][0]) == sorted(orders[0][1]) == [f.name for f in ranks[0].files]


def test_loader_workers_take_their_shards_in_turn(corpus, monkeypatch):
    root, _ = corpus
    batches = list(loader(root, num_workers=2, dp_rank=1, dp_world_size=2))
    streams = []
    for worker in range(2):
        fake_workers(monkeypatch, worker, 2)
        streams.append(list(dataset(root, dp_rank=1, dp_world_size=2)))
    in_turn = [b for batch in itertools.zip_longest(*streams) for b in batch if b is not None]
    assert_same(batches, in_turn)


def test_a_shard_without_tokens_fails_instead_of_hanging(tmp_path):
    (tmp_path / "only.txt").write_text("just one document")
    with pytest.raises(DataError, match="shard 1 of 2 got no train tokens"):
        next(iter(loader(str(tmp_path), split="train", infinite=True, dp_rank=1, dp_world_size=2)))


# ---------------------------------------------------------------- resume


def saved_state(loader_, k: int) -> dict:
    """The loader's state after k batches, through a serialisation round trip."""
    batches = iter(loader_)
    take(batches, k)
    state = loader_.state_dict()
    return pickle.loads(pickle.dumps(state))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_is_exact_across_epochs(corpus, num_workers):
    root, _ = corpus
    options = dict(split="train", infinite=True, shuffle_files=True, seed=7)
    options.update(dp_rank=1, dp_world_size=2, num_workers=num_workers)
    reference = take(iter(loader(root, **options)), 16)
    for k in (0, 1, 5, 11):
        state = saved_state(loader(root, **options), k)
        assert state["layout"] == {"dp_rank": 1, "dp_world_size": 2, "num_workers": num_workers}
        resumed = loader(root, **options)
        resumed.load_state_dict(state)
        assert_same(take(iter(resumed), 5), reference[k : k + 5])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_of_a_finite_stream(corpus, num_workers):
    root, _ = corpus
    reference = list(loader(root, num_workers=num_workers))
    for k in (2, len(reference) - 1, len(reference)):
        resumed = loader(root, num_workers=num_workers)
        resumed.load_state_dict(saved_state(loader(root, num_workers=num_workers), k))
        assert_same(list(resumed), reference[k:])


def test_dataset_state_is_plain_and_epochs_advance(corpus):
    root, _ = corpus
    train = dataset(root, split="train", infinite=True, shuffle_files=True)
    take(iter(train), 40)
    state = train.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert state["epoch"] >= 1 and state["num_batches"] == 40


@pytest.mark.parametrize("num_workers", [0, 2])
def test_state_from_another_world_size_is_refused(corpus, num_workers):
    root, _ = corpus
    state = saved_state(loader(root, dp_world_size=2, num_workers=num_workers), 2)
    refused = r"dp_world_size=2.*dp_world_size=1.*exclude_from_loading dataloader"
    with pytest.raises(DataError, match=refused):
        loader(root, num_workers=num_workers).load_state_dict(state)
    with pytest.raises(DataError, match="exclude_from_loading dataloader"):
        dataset(root).load_state_dict(dataset(root, dp_world_size=2).state_dict())
