"""The prepare driver: runs the phases of :mod:`llm360.data.prepare` on an executor, resumably.

Scratch layout (``<run>/.prepare/<config hash>/``, or under ``scratch_dir``)::

    tokenizer/  tokenizer.json      the tokenizer (trained or loaded) and what it was trained from
    lines/<key>.json                line counts of byte-range pieces
    map/<key>/                      one map task's output (key: config, tokenizer, piece, file stamps)
    plan-<hash>/plan.json           the plan; positions_SSS.npy (a stage's permutation, inverted)
    plan-<hash>/scatter/<key>.bin   one piece's rows, by chunk
    plan-<hash>/results/*.json      each scatter / reduce / table task's result, written last
    data-<hash>/                    the data set being built (always in the run directory)

A task whose result is present is never run again: that is what makes a killed prepare resume.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from llm360.config import RunConfig, SourceConfig
from llm360.data.documents import Document
from llm360.data.pieces import PIECE_BYTES, Piece, count_lines, list_pieces, number_lines
from llm360.data.prepare_manifest import SourceStats, build_manifest
from llm360.data.prepare_map import MAP_FORMAT, SUMMARY, TOKENS, MapSpec, map_piece, token_dtype, unit_hash
from llm360.data.prepare_plan import (
    check_stage_kinds,
    chunk_rows,
    make_plan,
    plan_hash,
    stage_draws,
    stage_json,
    write_positions,
)
from llm360.data.prepare_shuffle import (
    ReduceSpec,
    ScatterBlock,
    ScatterSpec,
    StageRows,
    reduce_chunk,
    scatter_piece,
)
from llm360.data.prepare_tables import TableSpec, write_tables
from llm360.data.tokenizer import TextTokenizer, load_saved, load_tokenizer_file, train_bpe
from llm360.errors import DataError
from llm360.executor import Executor, Task, TaskError, TaskFailed, raise_failure
from llm360.log import progress
from llm360.rundir.atomic import (
    atomic_folder,
    clean_leftovers,
    fsync_tree,
    install,
    json_bytes,
    make_dirs,
    write_json,
)
from llm360.rundir.layout import MANIFEST, RunDir
from llm360.utils import read_json, sha256_file

logger = logging.getLogger(__name__)


def _key(obj: object) -> str:
    return hashlib.sha256(json_bytes(obj)).hexdigest()[:24]


def _count_task(piece: Piece, result: str) -> int:
    n = count_lines(piece)
    write_json(Path(result), {"lines": n})
    return n


def _done(path: Path) -> dict | None:
    """A finished task's result, or None."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


class Build:
    """One prepare: the phases, the scratch folder, the final install. Use :func:`llm360.data.prepare.prepare`."""

    def __init__(self, cfg: RunConfig, rd: RunDir, executor: Executor, *, scratch_dir: Path | None = None,
                 piece_bytes: int | None = None) -> None:
        self.cfg, self.data, self.rd, self.ex = cfg, cfg.data, rd, executor
        self.L = self.data.seq_len + 1
        self.piece_bytes = int(piece_bytes or PIECE_BYTES)
        h = cfg.data_hash()[:16]
        self.build_root = rd.prepare_scratch / h
        # a scratch folder elsewhere is named for the run directory too: several runs may share it
        where = hashlib.sha256(str(rd.root.resolve()).encode()).hexdigest()[:8]
        self.root = (Path(scratch_dir).resolve() / f"llm360-prepare-{where}-{h}") if scratch_dir else self.build_root

    # ---------------------------------------------------------------------------- driver
    def run(self) -> dict:
        data = self.data
        check_stage_kinds(data)
        self._clean_scratch()
        self.ex.check_visible(self.root)
        if self.build_root != self.root:
            self.ex.check_visible(self.build_root)
        pieces = [self._pieces(src) for src in data.sources]
        tok_dir, tok_sha, vocab, eos_id, self.fim_ids = self._tokenizer(pieces)
        self.dtype = token_dtype(data, vocab)
        self.vocab_size, self.eos_id, self.tok_sha = vocab, eos_id, tok_sha
        pieces = self._number_lines(pieces)
        draws = stage_draws(data)
        specs = [[self._map_spec(p, src, t, draws[src.name], tok_dir, tok_sha) for p in pieces[t]]
                 for t, src in enumerate(data.sources)]
        summaries = self._map(specs, label="mapping pieces")
        for t, src in enumerate(data.sources):
            if not any(s["documents_in"] for s in summaries[t]):
                files = [str(f) for p in pieces[t] for f in p.files]
                logger.warning("source '%s' yielded no documents (files: %s)", src.name, files or "none")

        plan = make_plan(data, summaries, self.L)
        ph = plan_hash(plan, "|".join(Path(s.out).name for per in specs for s in per))
        self.plan_dir = self.root / f"plan-{ph}"
        make_dirs(self.plan_dir / "results")
        make_dirs(self.plan_dir / "scatter")
        for d in (self.plan_dir, self.plan_dir / "results", self.plan_dir / "scatter"):
            clean_leftovers(d)
        write_json(self.plan_dir / "plan.json", plan)
        for st in plan["stages"]:
            write_positions(self._positions(st), data.seed, st)
        self._warn_small_valid(summaries)

        out = self.build_root / f"data-{ph}"
        make_dirs(out)
        clean_leftovers(out)
        scatter_results, tables = self._scatter(plan, specs, out)
        chunks = self._reduce(plan, out)
        return self._finish(plan, pieces, summaries, scatter_results, chunks, tables, tok_dir, out)

    def _clean_scratch(self) -> None:
        """Keep only this config's scratch (one prepare per run directory), and clean what dead writers left."""
        if self.rd.prepare_scratch.is_dir():
            for e in self.rd.prepare_scratch.iterdir():
                if e != self.build_root:
                    logger.info("removing %s: scratch of another data config", e)
                    shutil.rmtree(e, ignore_errors=True)
        for d in (self.root, self.root / "map", self.root / "lines", self.build_root):
            make_dirs(d)
            clean_leftovers(d)

    # ------------------------------------------------------------------------- tokenizer
    def _pieces(self, src: SourceConfig) -> list[Piece]:
        return list_pieces(src, self.piece_bytes)

    def _tokenizer(self, pieces: list[list[Piece]]
                   ) -> tuple[Path | None, str | None, int, int | None, tuple[int, int, int] | None]:
        """(saved tokenizer folder, its sha256, vocabulary size, EOS id, FIM sentinel ids when a mix
        entry FIM-transforms): reused from the scratch when it was made from the same config and the
        same files. Raises DataError for a loaded tokenizer without the FIM sentinels FIM needs."""
        tcfg = self.data.tokenizer
        if tcfg.kind == "none":
            if any(s.kind != "llm360" for s in self.data.sources):
                raise DataError(
                    "data.tokenizer.kind = none only works when every source is pre-tokenized "
                    "(kind: llm360); set data.tokenizer.kind to train or file"
                )
            return None, None, tcfg.vocab_size, None, None
        folder = self.root / "tokenizer"
        stamp = _key([[p.identity() for p in per] for per in pieces]) if tcfg.kind == "train" else None
        if tcfg.kind == "file":
            if not tcfg.path:
                raise DataError(
                    "data.tokenizer.kind = file needs data.tokenizer.path "
                    "(a tokenizer.json, a Hugging Face tokenizer folder or a SentencePiece .model); "
                    "e.g. --set data.tokenizer.path=/models/llama/tokenizer.model"
                )
            tok, origin = load_tokenizer_file(tcfg.path, tcfg.eos_token)
            fim_ids = tok.fim_ids(tcfg.fim_tokens, f"the tokenizer {tcfg.path}") if self.data.uses_fim else None
        else:
            record = _done(self.root / "tokenizer.json")
            if record is not None and record.get("stamp") == stamp and folder.is_dir():
                tok = load_saved(folder)
                logger.info("reusing the tokenizer trained by an earlier run of this prepare")
                fim_ids = tok.fim_ids(tcfg.fim_tokens) if self.data.uses_fim else None
                return folder, record["sha256"], tok.vocab_size, tok.eos_id, fim_ids
            tok, origin = self._train_tokenizer()
            fim_ids = tok.fim_ids(tcfg.fim_tokens) if self.data.uses_fim else None
        with atomic_folder(folder) as tmp:
            sha = tok.save(tmp, origin)
        write_json(self.root / "tokenizer.json", {"stamp": stamp, "sha256": sha})
        return folder, sha, tok.vocab_size, tok.eos_id, fim_ids

    def _train_tokenizer(self) -> tuple[TextTokenizer, dict]:
        from llm360.data.sources import iter_source

        tcfg, data = self.data.tokenizer, self.data
        text_sources = [s for s in data.sources if s.kind != "llm360"]
        if not text_sources:
            raise DataError("cannot train a tokenizer: every source is pre-tokenized; use tokenizer kind file or none")
        per_source = max(1, tcfg.train_max_chars // len(text_sources))
        vf = data.valid_fraction
        with progress("training tokenizer", total=tcfg.train_max_chars, unit="chars") as bar:

            def texts() -> Iterator[str]:
                for src in text_sources:
                    used = 0
                    items = iter_source(src, max_document_chars=data.max_document_chars,
                                        min_document_chars=data.min_document_chars)
                    for item in items:
                        if not isinstance(item, Document) or (
                                vf > 0 and unit_hash(data.seed, "valid", src.name, item.doc_id) < vf):
                            continue
                        yield item.text
                        used += len(item.text)
                        bar.advance(len(item.text))
                        if used >= per_source:
                            break

            tok, origin = train_bpe(texts(), tcfg, tcfg.fim_tokens if data.uses_fim else ())
        origin["train_chars_per_source_max"] = per_source
        logger.info("trained a byte-level BPE tokenizer with %d tokens", tok.vocab_size)
        return tok, origin

    # ------------------------------------------------------------------------------- map
    def _number_lines(self, pieces: list[list[Piece]]) -> list[list[Piece]]:
        todo, results = [], {}
        for t, per in enumerate(pieces):
            for i, p in enumerate(per):
                if p.ranged:
                    path = self.root / "lines" / f"{_key(p.identity())}.json"
                    results[(t, i)] = path
                    if _done(path) is None:
                        todo.append(Task(f"count:{p.describe()}", _count_task, (p, str(path))))
        if todo:
            self.ex.run(todo, progress_label="counting lines", unit="pieces")
        return [number_lines(per, {i: read_json(results[(t, i)])["lines"] for i, p in enumerate(per)
                                   if (t, i) in results}) for t, per in enumerate(pieces)]

    def _map_spec(self, p: Piece, src: SourceConfig, t: int, draws: tuple, tok_dir: Path | None,
                  tok_sha: str | None) -> MapSpec:
        key = _key({"format": MAP_FORMAT, "data": self.cfg.data_hash(), "tokenizer": tok_sha,
                    "piece": p.identity(), "vocab": self.vocab_size, "dtype": self.dtype.str})
        d = self.data
        return MapSpec(
            piece=p, source=src, table=t, seed=d.seed, valid_fraction=d.valid_fraction,
            max_document_chars=d.max_document_chars, min_document_chars=d.min_document_chars,
            row_length=self.L, dtype=self.dtype.str, vocab_size=self.vocab_size, eos_id=self.eos_id,
            docs_per_batch=d.docs_per_batch, draws=draws, tokenizer_dir=str(tok_dir) if tok_dir else None,
            tokenizer_sha=tok_sha, out=str(self.root / "map" / key),
            fim_ids=self.fim_ids if any(dr.fim_rate > 0 for dr in draws) else None,
        )

    def _map(self, specs: list[list[MapSpec]], *, label: str, only: set[str] | None = None) -> list[list[dict]]:
        """Run the map tasks whose output is missing (or those in ``only``); every summary, per source and piece."""
        todo = [Task(f"map:{s.piece.describe()}", map_piece, (s,)) for per in specs for s in per
                if (only is None and _done(Path(s.out) / SUMMARY) is None) or (only is not None and s.out in only)]
        total = sum(len(per) for per in specs)
        if only is None and total - len(todo):
            logger.info("reusing %d of %d finished map tasks", total - len(todo), total)
        # every piece is tried, so one run names every bad file and leaves the most finished work
        failed = [r for r in self.ex.run(todo, progress_label=label, unit="pieces", keep_going=True)
                  if isinstance(r, TaskError)]
        if failed:
            if len(failed) > 1:
                logger.error("%d pieces failed: %s", len(failed), "; ".join(str(f) for f in failed))
            raise_failure(failed[0].key, failed[0].exception or TaskFailed(failed[0].key, failed[0].message))
        return [[read_json(Path(s.out) / SUMMARY) for s in per] for per in specs]

    # ----------------------------------------------------------------------------- plan
    def _positions(self, st: dict) -> Path:
        return self.plan_dir / f"positions_{st['index']:03d}.npy"

    def _warn_small_valid(self, summaries: list[list[dict]]) -> None:
        vf = self.data.valid_fraction
        for t, src in enumerate(self.data.sources):
            per = summaries[t]
            train = sum(s["documents_train"] for s in per)
            valid = sum(s["documents_valid"] for s in per)
            tokens = sum(s["tokens_valid"] for s in per)
            if vf > 0 and tokens // self.L == 0 and train:
                logger.warning(
                    "source '%s': valid_fraction = %g held out %d of its %d documents (%d tokens), less "
                    "than one %d-token row: it has no validation rows and held-out perplexity leaves it "
                    "out; raise data.valid_fraction for a corpus this small",
                    src.name, vf, valid, valid + train, tokens, self.L,
                )  # fmt: skip

    # --------------------------------------------------------------------------- scatter
    def _scatter_specs(self, plan: dict, specs: list[list[MapSpec]]) -> dict[tuple[int, int], ScatterSpec]:
        stages = tuple(
            StageRows(st["index"], st["first_chunk"], st["chunks"], st["rows_per_chunk"], st["cap"],
                      str(self._positions(st)), st.get("rows_extra", 0))
            for st in plan["stages"]
        )
        n_chunks = sum(st["chunks"] for st in plan["stages"])
        blocks: dict[tuple[int, int], list[ScatterBlock]] = {}
        for st in plan["stages"]:
            for entry, epoch, t, pi, start, tokens in st["blocks"]:
                draw = next(d for d in specs[t][pi].draws if d.stage == st["index"] and d.entry == entry)
                blocks.setdefault((t, pi), []).append(ScatterBlock(draw, epoch, start, tokens))
        out = {}
        for (t, pi), bl in blocks.items():
            ms, info = specs[t][pi], plan["pieces"][t][pi]
            name = Path(ms.out).name
            out[(t, pi)] = ScatterSpec(
                map_dir=ms.out, out=str(self.plan_dir / "scatter" / f"{name}.bin"),
                result=str(self.plan_dir / "results" / f"scatter-{name}.json"), table=t,
                doc_base=info["doc_base"], names_map=tuple(info["names_map"]), row_length=self.L,
                dtype=self.dtype.str, n_chunks=n_chunks, stages=stages, blocks=tuple(bl), fim=self.data.uses_fim,
            )
        return out

    def _scatter(self, plan: dict, specs: list[list[MapSpec]], out: Path) -> tuple[list[dict], list[dict]]:
        """Scatter every piece, and write every source's documents table beside it (both need only the
        map outputs and the plan; a big source's table is the longest single task, so it starts first)."""
        self.scatter_specs = self._scatter_specs(plan, specs)
        results = self.plan_dir / "results"
        table_specs = [
            TableSpec(name=src.name, snapshot=src.snapshot,
                      parts=tuple((s.out, plan["pieces"][t][i]["doc_base"]) for i, s in enumerate(specs[t])),
                      row_length=self.L, dtype=self.dtype.str, out_dir=str(out),
                      result=str(results / f"table-{t:04d}.json"))
            for t, src in enumerate(self.data.sources)
        ]
        tables = [Task(f"table:{s.name}", write_tables, (s,)) for s in table_specs if _done(Path(s.result)) is None]
        todo = {k: s for k, s in self.scatter_specs.items() if _done(Path(s.result)) is None}
        # a piece whose tokens a finished scatter of an earlier plan freed: map it again first
        again = {s.map_dir for s in todo.values() if not (Path(s.map_dir) / TOKENS).is_file()}
        if again:
            self._map(specs, label="mapping pieces again", only=again)
        if len(todo) < len(self.scatter_specs):
            logger.info("reusing %d of %d finished scatter tasks", len(self.scatter_specs) - len(todo),
                        len(self.scatter_specs))
        scatters = [Task(f"scatter:{specs[t][pi].piece.describe()}", scatter_piece, (s,))
                    for (t, pi), s in sorted(todo.items())]
        self.ex.run(tables + scatters, progress_label="scattering rows, writing documents tables", unit="tasks")
        return ([read_json(Path(s.result)) for s in self.scatter_specs.values()],
                [read_json(Path(s.result)) for s in table_specs])

    # ---------------------------------------------------------------------------- reduce
    def _reduce(self, plan: dict, out: Path) -> list[dict]:
        names = tuple(plan["source_names"])
        by_stage: dict[int, list[str]] = {}
        for _, s in sorted(self.scatter_specs.items()):
            for stage in sorted({b.draw.stage for b in s.blocks}):
                by_stage.setdefault(stage, []).append(s.out)
        results = self.plan_dir / "results"
        reduce_specs = []
        for st in plan["stages"]:
            listing = self.plan_dir / f"scattered_{st['index']:03d}.json"
            write_json(listing, by_stage.get(st["index"], []))
            for c in range(st["chunks"]):
                ci = st["first_chunk"] + c
                reduce_specs.append(ReduceSpec(
                    chunk=ci, stage=st["name"], rows=chunk_rows(st, c), row_length=self.L,
                    dtype=self.dtype.str, source_names=names, scattered=str(listing),
                    out_dir=str(out), result=str(results / f"chunk-{ci:06d}.json"), fim=self.data.uses_fim))
        tasks = [Task(f"reduce:chunk_{s.chunk:03d}", reduce_chunk, (s,)) for s in reduce_specs
                 if _done(Path(s.result)) is None]
        if len(tasks) < len(reduce_specs):
            logger.info("reusing %d of %d finished chunks", len(reduce_specs) - len(tasks), len(reduce_specs))
        self.ex.run(tasks, progress_label="reducing chunks", unit="chunks")
        return [read_json(Path(s.result)) for s in reduce_specs]

    # ---------------------------------------------------------------------------- finish
    def _finish(self, plan: dict, pieces: list[list[Piece]], summaries: list[list[dict]], scattered: list[dict],
                chunks: list[dict], tables: list[dict], tok_dir: Path | None, out: Path) -> dict:
        from llm360.data.sources import doc_id_base, list_source_files

        data = self.data
        names = plan["source_names"]
        stats: dict[str, SourceStats] = {}
        for t, src in enumerate(data.sources):
            st = SourceStats(kind=src.kind)
            if src.kind != "embedded":
                st.files = [str(p) for p in list_source_files(src)]
                st.doc_id_base = str(doc_id_base(src))
            for s in summaries[t]:
                st.add_map(s)
            st.valid_rows = tables[t]["valid_rows"]
            if tables[t]["valid_partial_row"]:
                st.tokens_dropped["valid_partial_row"] += tables[t]["valid_partial_row"]
            stats[src.name] = st
        row_dropped: dict[str, Counter] = {}
        for res in scattered:
            for name_id, reasons in res["dropped"].items():
                name = names[int(name_id)]
                target = stats[name].tokens_dropped if name in stats else row_dropped.setdefault(name, Counter())
                target.update(reasons)
        (out / "documents").mkdir(exist_ok=True)
        (out / "valid").mkdir(exist_ok=True)
        files: dict[str, dict] = {}
        if tok_dir is not None:
            dst = out / "tokenizer"
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(tok_dir, dst)
            for p in sorted(dst.iterdir()):
                files[f"tokenizer/{p.name}"] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for tab in tables:
            files.update(tab["files"])
        chunk_json = []
        for ch in chunks:
            ch = dict(ch)
            files[ch["file"]] = {"sha256": ch["sha256"], "bytes": ch.pop("bytes")}
            files[ch["provenance"]] = {"sha256": ch["provenance_sha256"], "bytes": ch.pop("provenance_bytes")}
            chunk_json.append(ch)
        manifest = build_manifest(
            self.cfg, dtype=self.dtype, vocab_size=self.vocab_size, eos_id=self.eos_id, tokenizer_sha=self.tok_sha,
            source_names=names, stats=stats, row_dropped=row_dropped,
            stages=[stage_json(st) for st in plan["stages"]], chunks=chunk_json, files=files,
        )
        write_json(out / MANIFEST, manifest)
        # Every task is done and the run's lock is held: what a killed earlier attempt's workers left
        # here (skipped at the start while their pids still answered) goes before the folder is installed.
        clean_leftovers(out, writers_done=True)
        fsync_tree(out)
        install(out, self.rd.data)
        shutil.rmtree(self.rd.prepare_scratch, ignore_errors=True)
        if self.root != self.build_root:
            shutil.rmtree(self.root, ignore_errors=True)
        return manifest



