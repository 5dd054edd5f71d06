"""Source readers: every kind in order with stable ids, every bad input counted or named."""

from __future__ import annotations

import bz2
import collections
import gzip
import json
import logging
import lzma
import os
import shutil
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from llm360.config import SourceConfig
from llm360.data import embedded
from llm360.data.documents import Document, Rejected, TokenRow, content_hash
from llm360.data.sources import REJECT_REASONS, iter_source, list_source_files
from llm360.errors import DataError

MAX = 10_000
MIN = 1


def read(src: SourceConfig, max_chars: int = MAX, min_chars: int = MIN) -> list:
    return list(iter_source(src, max_document_chars=max_chars, min_document_chars=min_chars))


def src(kind: str, *paths: str | Path, **kw) -> SourceConfig:
    return SourceConfig(name="s", kind=kind, paths=[str(p) for p in paths], **kw)


def write_jsonl(path: Path, records: list, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def docs(items: list) -> list[tuple[str, str]]:
    assert all(isinstance(i, Document) for i in items), [i for i in items if not isinstance(i, Document)]
    return [(i.doc_id, i.text) for i in items]


def reasons(items: list) -> list[str | None]:
    return [i.reason if isinstance(i, Rejected) else None for i in items]


@pytest.fixture(autouse=True)
def _cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Relative paths as given in the config become the ids.
    monkeypatch.chdir(tmp_path)


# ----------------------------------------------------------------------------------- jsonl


def test_jsonl_roundtrip_in_order_with_line_ids(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "one"}\n\n{"text": "two", "x": 1}\r\n   \n{"text": "three"}', encoding="utf-8")
    items = read(src("jsonl", "a.jsonl"))
    # Blank lines carry no record but still count for line numbers; CRLF and a missing final newline are fine.
    assert docs(items) == [("a.jsonl:1", "one"), ("a.jsonl:3", "two"), ("a.jsonl:5", "three")]
    assert all(i.source == "s" for i in items)
    assert read(src("jsonl", "a.jsonl")) == items  # deterministic


def test_jsonl_text_field_and_bom(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_bytes(b'\xef\xbb\xbf{"content": "x"}\n{"content": "y"}\n')
    assert docs(read(src("jsonl", "a.jsonl", text_field="content"))) == [
        ("a.jsonl:1", "x"),
        ("a.jsonl:2", "y"),
    ]


@pytest.mark.parametrize(
    ("suffix", "opener"),
    [
        ("jsonl.gz", gzip.open),
        ("jsonl.zst", lambda p, mode, encoding: zstandard.open(p, mode, encoding=encoding)),
        ("json.bz2", bz2.open),
        ("jsonl.xz", lzma.open),
    ],
)
def test_jsonl_compressed(tmp_path: Path, suffix: str, opener) -> None:
    recs = [{"text": f"doc {i} é ✓"} for i in range(1000)]
    write_jsonl(tmp_path / f"d.{suffix}", recs, opener)
    items = read(src("jsonl", f"d.{suffix}"))
    assert docs(items) == [(f"d.{suffix}:{i + 1}", r["text"]) for i, r in enumerate(recs)]


def test_jsonl_multi_frame_zstd(tmp_path: Path) -> None:
    c = zstandard.ZstdCompressor()
    (tmp_path / "d.jsonl.zst").write_bytes(c.compress(b'{"text": "a"}\n') + c.compress(b'{"text": "b"}\n'))
    assert docs(read(src("jsonl", "d.jsonl.zst"))) == [("d.jsonl.zst:1", "a"), ("d.jsonl.zst:2", "b")]


def test_compressed_file_without_suffix_is_detected(tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_bytes(gzip.compress(b'{"text": "a"}\n'))
    assert docs(read(src("jsonl", "d.jsonl"))) == [("d.jsonl:1", "a")]


def test_jsonl_bad_lines_each_rejected_once(tmp_path: Path) -> None:
    lines = [
        b'{"text": "ok"}',  # 1
        b'{"text": "broken"',  # 2 malformed_json
        b'["a", "list"]',  # 3 not_an_object
        b'{"body": "x", "id": 3}',  # 4 missing_text_field
        b'{"text": null}',  # 5 text_not_a_string
        b'{"text": 42}',  # 6 text_not_a_string
        b'{"text": "caf\xe9"}',  # 7 invalid_utf8 (latin-1 byte)
        b'{"text": "   \\n\\t "}',  # 8 empty
        b'{"text": ""}',  # 9 empty
        b'{"text": "' + b"x" * 51 + b'"}',  # 10 too_large (max 50)
        b'{"text": "lone \\ud800 surrogate"}',  # 11 invalid_utf8
        b'{"text": "pair \\ud83d\\ude00 ok"}',  # 12 fine
        b'"just a string"',  # 13 not_an_object
        b'{"text": "ok again"}',  # 14
    ]
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    items = read(src("jsonl", "bad.jsonl"), max_chars=50)
    assert len(items) == len(lines)  # every line yields exactly one item
    assert [i.doc_id for i in items] == [f"bad.jsonl:{n}" for n in range(1, len(lines) + 1)]
    assert reasons(items) == [
        None,
        "malformed_json",
        "not_an_object",
        "missing_text_field",
        "text_not_a_string",
        "text_not_a_string",
        "invalid_utf8",
        "empty",
        "empty",
        "too_large",
        "invalid_utf8",
        None,
        "not_an_object",
        None,
    ]
    by_line = {i.doc_id: i for i in items}
    assert "column" in by_line["bad.jsonl:2"].detail  # the parser's message
    assert "'body'" in by_line["bad.jsonl:4"].detail and "'id'" in by_line["bad.jsonl:4"].detail
    assert "null" in by_line["bad.jsonl:5"].detail
    assert "51" in by_line["bad.jsonl:10"].detail
    assert by_line["bad.jsonl:12"].text == "pair \U0001f600 ok"
    assert {i.reason for i in items if isinstance(i, Rejected)} <= set(REJECT_REASONS)


def test_min_document_chars(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [{"text": "  abc  "}, {"text": "abcd"}, {"text": ""}])
    assert reasons(read(src("jsonl", "a.jsonl"), min_chars=4)) == ["empty", None, "empty"]
    assert reasons(read(src("jsonl", "a.jsonl"), min_chars=0)) == [None, None, None]


def test_overlong_line_rejected_without_loading(tmp_path: Path) -> None:
    # max_document_chars=1 gives a line limit of 1 MiB + 12 bytes; this line is 3 MiB without a newline.
    (tmp_path / "a.jsonl").write_bytes(
        b'{"text": "ok"}\n{"text": "' + b"y" * (3 << 20) + b'"}\n{"text": "z"}'
    )
    items = read(src("jsonl", "a.jsonl"), max_chars=2)
    assert reasons(items) == [None, "too_large", None]
    assert items[2].doc_id == "a.jsonl:3"


def test_pretty_printed_json_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("\n" + json.dumps([{"text": "a"}], indent=2), encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.json.*line 2.*JSON Lines.*jq -c '\.\[\]'"):
        read(src("jsonl", "a.json"))
    (tmp_path / "o.json").write_text(json.dumps({"text": "a"}, indent=2), encoding="utf-8")
    with pytest.raises(DataError, match=r"o\.json.*line 1.*jq -c '\.'"):
        read(src("jsonl", "o.json"))


@pytest.mark.parametrize("suffix", ["gz", "zst"])
def test_corrupt_compressed_stream_is_a_data_error(tmp_path: Path, suffix: str) -> None:
    payload = b"".join(b'{"text": "document %d"}\n' % i for i in range(20000))
    data = gzip.compress(payload) if suffix == "gz" else zstandard.ZstdCompressor().compress(payload)
    (tmp_path / f"t.jsonl.{suffix}").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(DataError, match=rf"t\.jsonl\.{suffix}.*line \d+"):
        read(src("jsonl", f"t.jsonl.{suffix}"))
    (tmp_path / f"n.jsonl.{suffix}").write_bytes(b"this is not compressed at all\n")
    with pytest.raises(DataError, match=rf"n\.jsonl\.{suffix}.*line 1"):
        read(src("jsonl", f"n.jsonl.{suffix}"))


def test_empty_file_yields_nothing(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_bytes(b"")
    (tmp_path / "e.jsonl.gz").write_bytes(gzip.compress(b""))
    assert read(src("jsonl", "e.jsonl", "e.jsonl.gz")) == []


# ------------------------------------------------------------------------- path expansion


def test_folders_and_globs_sorted_recursively(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for rel in ["d/b.jsonl", "d/a.jsonl.gz", "d/sub/c.jsonl", "d/sub/a.json", "d/.hidden.jsonl", "e/z.jsonl"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        opener = gzip.open if rel.endswith(".gz") else open
        write_jsonl(tmp_path / rel, [{"text": rel}], opener)
    (tmp_path / "d" / "README.md").write_text("# not data\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="llm360"):
        s = src("jsonl", "e/z.jsonl", "d")
        files = list_source_files(s)
    assert [p.as_posix() for p in files] == [
        "d/a.jsonl.gz",
        "d/b.jsonl",
        "d/sub/a.json",
        "d/sub/c.jsonl",
        "e/z.jsonl",
    ]
    assert "README.md" in caplog.text  # skipped, but said so
    assert [i.doc_id for i in read(s)] == [f"{p.as_posix()}:1" for p in files]
    assert [i.text for i in read(s)] == [p.as_posix() for p in files]

    globbed = src("jsonl", "d/**/*.json*")
    assert [p.as_posix() for p in list_source_files(globbed)] == [
        "d/a.jsonl.gz",
        "d/b.jsonl",
        "d/sub/a.json",
        "d/sub/c.jsonl",
    ]
    # A file named twice (directly and through its folder) is read once.
    assert len(read(src("jsonl", "d", "d/b.jsonl"))) == 4


def test_missing_paths_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.jsonl"):
        read(src("jsonl", "nope.jsonl"))
    with pytest.raises(DataError, match=r"glob 'x/\*\.jsonl' matches nothing"):
        list_source_files(src("jsonl", "x/*.jsonl"))
    with pytest.raises(DataError, match="no paths"):
        read(src("jsonl"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="empty_dir"):
        read(src("jsonl", "empty_dir"))


def test_doc_ids_do_not_depend_on_where_the_corpus_lies(tmp_path: Path) -> None:
    # Ids are relative to the deepest folder holding all of a source's paths, so the split and the
    # mix of a re-prepared corpus do not change when it is moved or named by an absolute path.
    for rel in ["corpus/web/a.jsonl", "corpus/web/sub/b.jsonl", "corpus/c.jsonl"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(tmp_path / rel, [{"text": rel}])
    expected = ["c.jsonl:1", "web/a.jsonl:1", "web/sub/b.jsonl:1"]
    assert [i.doc_id for i in read(src("jsonl", "corpus"))] == expected
    assert [i.doc_id for i in read(src("jsonl", tmp_path / "corpus"))] == expected
    assert [i.doc_id for i in read(src("jsonl", "corpus/**/*.jsonl"))] == expected
    shutil.move(tmp_path / "corpus", tmp_path / "elsewhere")
    moved = src("jsonl", tmp_path / "elsewhere" / "web", "elsewhere/c.jsonl")  # absolute and relative
    assert [i.doc_id for i in read(moved)] == expected
    assert [i.doc_id for i in read(src("jsonl", tmp_path / "elsewhere" / "c.jsonl"))] == ["c.jsonl:1"]
    # A folder's ids do not change when a file is added to it.
    write_jsonl(tmp_path / "elsewhere" / "a0.jsonl", [{"text": "new"}])
    assert [i.doc_id for i in read(src("jsonl", "elsewhere"))] == ["a0.jsonl:1", *expected]


# ---------------------------------------------------------------------------------- parquet


def test_parquet_multiple_row_groups(tmp_path: Path) -> None:
    texts = [f"row {i}" for i in range(25)]
    table = pa.table({"id": list(range(25)), "text": texts})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=7)
    assert pq.ParquetFile(tmp_path / "p.parquet").num_row_groups == 4
    pq.write_table(pa.table({"text": ["second file"]}), tmp_path / "q.parquet")
    items = read(src("parquet", "q.parquet", "p.parquet"))
    assert docs(items) == [(f"p.parquet:{i}", t) for i, t in enumerate(texts)] + [
        ("q.parquet:0", "second file")
    ]


def test_parquet_bad_values(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": ["a", None, "", "b" * 20]}), tmp_path / "s.parquet")
    assert reasons(read(src("parquet", "s.parquet"), max_chars=10)) == [
        None,
        "text_not_a_string",
        "empty",
        "too_large",
    ]
    binary = pa.table({"body": pa.array([b"fine", b"caf\xe9", None], pa.binary())})
    pq.write_table(binary, tmp_path / "b.parquet")
    items = read(src("parquet", "b.parquet", text_field="body"))
    assert reasons(items) == [None, "invalid_utf8", "text_not_a_string"]
    assert items[0].text == "fine"
    # Some writers put bytes that are not UTF-8 into a *string* column; pyarrow then fails on the batch.
    bad_string = pa.array([b"ok", b"caf\xe9", b"end"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"text": bad_string}), tmp_path / "u.parquet")
    items = read(src("parquet", "u.parquet"))
    assert reasons(items) == [None, "invalid_utf8", None]
    assert [i.doc_id for i in items] == ["u.parquet:0", "u.parquet:1", "u.parquet:2"]


def test_parquet_file_errors(tmp_path: Path) -> None:
    pq.write_table(pa.table({"content": ["a"], "url": ["u"]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c\.parquet.*'text'.*\['content', 'url'\]"):
        read(src("parquet", "c.parquet"))
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "i.parquet")
    with pytest.raises(DataError, match=r"i\.parquet.*int64"):
        read(src("parquet", "i.parquet"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"junk\.parquet.*not a readable Parquet file"):
        read(src("parquet", "junk.parquet"))


# ------------------------------------------------------------------------------------- text


def test_text_files(tmp_path: Path) -> None:
    (tmp_path / "t" / "sub").mkdir(parents=True)
    (tmp_path / "t" / "b.txt").write_text("bee", encoding="utf-8")
    (tmp_path / "t" / "a.md").write_bytes(b"\xef\xbb\xbfalpha\n")
    (tmp_path / "t" / "sub" / "c.py").write_text("print('c')\n", encoding="utf-8")
    (tmp_path / "t" / "bin.dat").write_bytes(b"\x00\xff\xfe")
    (tmp_path / "t" / "blank.txt").write_text(" \n", encoding="utf-8")
    (tmp_path / "t" / "big.txt").write_text("z" * 500, encoding="utf-8")
    (tmp_path / "t" / "huge.txt").write_text("z" * 5000, encoding="utf-8")
    items = read(src("text", "t"), max_chars=1000)
    assert [i.doc_id for i in items] == [  # relative to t/, the folder that holds them all
        "a.md",
        "b.txt",
        "big.txt",
        "bin.dat",
        "blank.txt",
        "huge.txt",
        "sub/c.py",
    ]
    assert reasons(items) == [None, None, None, "invalid_utf8", "empty", "too_large", None]
    assert items[0].text == "alpha\n" and items[-1].text == "print('c')\n"


# ------------------------------------------------------------------------------- hf datasets


def test_hf_dataset_and_dataset_dict(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    train = datasets.Dataset.from_dict({"text": ["t0", "t1", "", "t3"], "n": [0, 1, 2, 3]})
    train.save_to_disk(str(tmp_path / "ds"))
    items = read(src("hf_dataset", "ds"))
    assert [(i.doc_id, getattr(i, "text", None)) for i in items] == [
        ("ds:0", "t0"),
        ("ds:1", "t1"),
        ("ds:2", None),
        ("ds:3", "t3"),
    ]
    assert reasons(items)[2] == "empty"
    assert [p.as_posix() for p in list_source_files(src("hf_dataset", "ds"))] == [
        "ds/data-00000-of-00001.arrow"
    ]

    test = datasets.Dataset.from_dict({"text": ["x"]})
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    assert [i.doc_id for i in read(src("hf_dataset", "dd"))] == [
        "dd/train:0",
        "dd/train:1",
        "dd/train:2",
        "dd/train:3",
    ]

    datasets.DatasetDict({"validation": test, "test": test}).save_to_disk(str(tmp_path / "nd"))
    with pytest.raises(DataError, match=r"nd.*no 'train' split.*'validation'.*'test'"):
        read(src("hf_dataset", "nd"))
    with pytest.raises(DataError, match=r"ds.*'body'.*\['text', 'n'\]"):
        read(src("hf_dataset", "ds", text_field="body"))
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.jsonl").write_text("{}\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"plain.*not a dataset saved by `datasets`"):
        read(src("hf_dataset", "plain"))


# ----------------------------------------------------------------------------------- llm360


def test_llm360_rows(tmp_path: Path) -> None:
    lines = [
        {"token_ids": [1, 2, 3], "source": "arxiv"},
        {"token_ids": [4, 5, 6], "source": "c4"},
        {"source": "c4"},  # missing_token_ids
        {"token_ids": "1 2 3", "source": "c4"},  # bad
        {"token_ids": [1, 2.5, 3], "source": "c4"},  # bad
        {"token_ids": [1, True, 3], "source": "c4"},  # bad
        {"token_ids": [1, -2, 3], "source": "c4"},  # bad
        {"token_ids": [], "source": "c4"},  # bad
        "not json",  # malformed
        [1, 2, 3],  # not an object
        {"token_ids": [7, 8, 9]},  # no source: counted under the configured name
    ]
    write_jsonl(tmp_path / "train_000.jsonl", lines)
    items = read(src("llm360", "train_000.jsonl"))
    assert reasons(items) == [
        None,
        None,
        "missing_token_ids",
        "bad_token_ids",
        "bad_token_ids",
        "bad_token_ids",
        "bad_token_ids",
        "bad_token_ids",
        "malformed_json",
        "not_an_object",
        None,
    ]
    rows = [i for i in items if isinstance(i, TokenRow)]
    assert [(r.doc_id, list(r.token_ids), r.row_source) for r in rows] == [
        ("train_000.jsonl:1", [1, 2, 3], "arxiv"),
        ("train_000.jsonl:2", [4, 5, 6], "c4"),
        ("train_000.jsonl:11", [7, 8, 9], "s"),
    ]
    assert "token_ids[1]" in items[4].detail


# --------------------------------------------------------------------------------- embedded


@pytest.mark.parametrize("part", embedded.PARTS)
def test_embedded_parts_nonempty_and_deterministic(part: str) -> None:
    first = [(i, content_hash(t)) for i, t in embedded.iter_embedded(part)]
    second = [(i, content_hash(t)) for i, t in embedded.iter_embedded(part)]
    assert first and first == second
    ids = [i for i, _ in first]
    assert len(set(ids)) == len(ids)
    prefix = {"code": "stdlib/", "docs": "pydoc:", "package-docs": "pkg:", "licenses": "license:"}[part]
    assert all(i.startswith(prefix) for i in ids)
    if part in ("code", "docs"):
        assert ids == sorted(ids)


def test_embedded_code_excludes_tests_and_tools() -> None:
    ids = [i for i, _ in embedded.iter_embedded_items("code")]
    assert "stdlib/json/decoder.py" in ids
    parts = {p for i in ids for p in i.split("/")[1:-1]}
    assert not parts & {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__", "pydoc_data"}


def test_embedded_licenses_keep_duplicates() -> None:
    counts = collections.Counter(content_hash(t) for _, t in embedded.iter_embedded("licenses"))
    assert max(counts.values()) > 1


def test_embedded_through_iter_source(monkeypatch: pytest.MonkeyPatch) -> None:
    items = read(SourceConfig(name="docs", kind="embedded", embedded="docs"), max_chars=10**9)
    assert items and all(isinstance(i, Document) and i.source == "docs" for i in items)

    def fake(part: str):
        yield "stdlib/a.py", "print(1)\n"
        yield "stdlib/b.py", embedded.Undecodable("invalid start byte")
        yield "stdlib/c.py", "   "

    monkeypatch.setattr(embedded, "iter_embedded_items", fake)
    items = read(SourceConfig(name="code", kind="embedded", embedded="code"))
    assert reasons(items) == [None, "invalid_utf8", "empty"]
    assert list_source_files(SourceConfig(name="code", kind="embedded", embedded="code")) == []


# ----------------------------------------------------------------------------------- memory


def test_jsonl_memory_stays_flat(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    text = "lorem ipsum dolor sit amet " * 180  # ~4.9 kB
    with open(path, "w", encoding="utf-8") as f:
        for i in range(10_500):
            f.write(json.dumps({"id": i, "text": f"{i} {text}"}) + "\n")
    assert os.path.getsize(path) > 50_000_000
    tracemalloc.start()
    try:
        n = sum(
            1 for _ in iter_source(src("jsonl", "big.jsonl"), max_document_chars=MAX, min_document_chars=MIN)
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert n == 10_500
    assert peak < 20_000_000, f"peak traced memory {peak / 1e6:.1f} MB"


def test_symlinked_folders_followed_without_cycles(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    write_jsonl(tmp_path / "real" / "a.jsonl", [{"text": "a"}])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "linked").symlink_to(tmp_path / "real", target_is_directory=True)
    (tmp_path / "d" / "loop").symlink_to(tmp_path / "d", target_is_directory=True)
    assert docs(read(src("jsonl", "d"))) == [("linked/a.jsonl:1", "a")]
