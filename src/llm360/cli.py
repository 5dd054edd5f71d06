"""The `llm360` command: parse arguments, call one stage, show the result.

Stages live in their modules; this file only parses, calls and prints. Results go to stdout
(:class:`~llm360.console.Results`; one JSON document with ``--json``), logs and progress to stderr.
A user mistake (:class:`~llm360.errors.Llm360Error`) is printed as one clear message on stderr,
without a traceback. Exit codes: see :data:`EXIT_CODES`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from llm360 import __version__
from llm360.console import Results
from llm360.errors import ConfigError, Llm360Error
from llm360.log import console, setup_logging

logger = logging.getLogger("llm360.cli")

Handler = Callable[[argparse.Namespace], int]

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_CODES = f"""exit codes:
  {EXIT_OK}    success
  {EXIT_CHECK_FAILED}    a check failed: verify found a mismatch, an evaluation or analysis item failed,
       `llm360 plan` found that the layout does not fit,
       a stage of `llm360 run` failed
  {EXIT_USAGE}    usage or config error: a bad flag, an invalid config, a missing or malformed input
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); nothing half-written is kept, the same command resumes

Results go to stdout (one JSON document with --json), logs and progress to stderr."""

out = Results(sys.stdout)
"""Where results go; main() points it at the stdout it was called with."""


def _add_config_args(p: argparse.ArgumentParser, *, positional: bool = True) -> None:
    if positional:
        p.add_argument("config", nargs="?", help="YAML config (default: the embedded default corpus)")
    p.add_argument("--preset", help="start from a preset: embedded, amber, crystalcoder")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field, e.g. --set data.seq_len=512 (repeatable; every field with its meaning: "
        "`llm360 config fields`)",
    )


def _load_config(args: argparse.Namespace):
    """The config named on the command line; else the run directory's own; else the embedded default."""
    from llm360.config import load_config
    from llm360.rundir.layout import RunDir

    path = getattr(args, "config", None)
    run_dir = getattr(args, "run_dir", None)
    if path is None and args.preset is None and run_dir is not None and RunDir(run_dir).config.is_file():
        path = RunDir(run_dir).config
        logger.info("using the run directory's config %s", path)
    return load_config(path, preset=args.preset, overrides=args.overrides)


# ----------------------------------------------------------------------------- commands


def cmd_prepare(args: argparse.Namespace) -> int:
    from llm360.data.prepare import prepare

    cfg = _load_config(args)
    with _executor(args) as ex:
        res = prepare(cfg, args.run_dir, executor=ex, force=args.force, scratch_dir=args.scratch_dir)
    m = res.manifest
    if not res.built:
        out.print(f"[green]data is up to date[/] in {escape(str(args.run_dir))}/data — nothing to do")
        return 0
    table = Table(title=f"prepared {m['num_chunks']} chunks into {escape(str(args.run_dir))}/data")
    for col in ("source", "docs in", "used", "rejected", "train tokens", "valid rows"):
        table.add_column(col, justify="right" if col != "source" else "left")
    for name, s in m["sources"].items():
        rej = ", ".join(f"{k}: {v}" for k, v in s["documents_rejected"].items()) or "0"
        table.add_row(escape(name), str(s["documents_in"]), str(s["documents_used"]), escape(rej),
                      f"{s['tokens_train_documents']:,}", str(s["valid_rows"]))
    out.table(table)
    out.print(f"{m['total_rows']:,} rows x {m['row_length']} tokens = {m['total_tokens']:,} tokens, "
              f"dtype {m['token_dtype']}, vocab {m['vocab_size']}")
    return 0


def _print_row(view, max_chars: int) -> None:
    spans = ", ".join(
        f"{escape(s['source'])}:{escape(str(s['doc_id']))}@{s['doc_offset']}+{s['length']}"
        + (f" (FIM {s['fim_copy']['mode'].upper()} copy {s['fim']})" if s.get("fim_copy") else "") for s in view.spans
    )
    where = "" if view.position is None else f"[{view.position}] "
    out.print(f"[bold]{escape(where)}chunk {view.chunk:03d} row {view.row}[/]  documents: {spans}")
    if view.text is None:
        out.print(escape(str(view.token_ids[:max_chars])))
    else:
        text = view.text if len(view.text) <= max_chars else view.text[:max_chars] + " …"
        out.print(escape(text))


def _print_notes(notes: list[str], ok: bool) -> None:
    for i, line in enumerate(notes):
        style = "green" if ok and i == 0 else "yellow"
        out.print(f"[{style}]{escape(line)}[/]")


def _span_line(s) -> str:
    """One place of a document's tokens: where in the data, and when (and whether) it was trained."""
    what = f"FIM copy {s.fim}" if getattr(s, "fim", 0) else "document"
    where = (f"chunk {s.chunk:03d} row {s.row}: tokens {s.doc_offset}..{s.doc_offset + s.length - 1} of the "
             f"{what} at positions {s.row_offset}..{s.row_offset + s.length - 1} of the row")
    p = s.place
    if p is None:
        return escape(where)
    if p.step is None:
        return f"{escape(where)}  [yellow]{escape(p.status)}[/]"
    style = "green" if p.status == "trained" else "yellow"
    when = f"step {p.step} (index {p.index_in_step} of its batch)  [{style}]{escape(p.status)}[/]"
    return f"{escape(where)}  {when}" + (f"  first in {escape(s.checkpoint)}" if s.checkpoint else "")


def cmd_inspect_doc(args: argparse.Namespace) -> int:
    from llm360.data.inspect import view_document

    dv = view_document(args.run_dir, args.source, args.id, args.global_batch)
    if args.json:
        out.json(dv.to_json())
        return 0
    _print_notes(dv.notes, bool(dv.trained_spans))
    for s in dv.spans[: args.max_spans]:
        out.print("  " + _span_line(s))
    if len(dv.spans) > args.max_spans:
        out.print(f"  (the first {args.max_spans} of {len(dv.spans)} spans; --max-spans N or --json for all)")
    return 0


def cmd_inspect_find(args: argparse.Namespace) -> int:
    from llm360.analysis.find import find_text

    if (args.text is None) == (args.file is None):
        raise ConfigError("give the text to find, or --file FILE holding it (one of the two)")
    if args.file is not None:
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--file {args.file}: cannot read it as UTF-8 text ({e})") from None
    else:
        text = args.text
    res = find_text(args.run_dir, text, global_batch=args.global_batch, max_matches=args.max_matches)
    if args.json:
        out.json(res.to_json())
        return 0
    _print_notes(res.notes, res.exact)
    for m in res.matches:
        docs = ", ".join(f"{escape(d['source'])}:{escape(str(d['doc_id']))}@{d['doc_offset']}" for d in m.documents)
        p = m.place
        if p is None:
            when = ""
        elif p.step is None:
            when = f"  [yellow]{escape(p.status)}[/]"
        else:
            style = "green" if p.status == "trained" else "yellow"
            when = (f"  step {p.step} [{style}]{escape(p.status)}[/]"
                    + (f"  first in {escape(m.checkpoint)}" if m.checkpoint else ""))
        part = "" if res.exact else f"  tokens {m.text_start}..{m.text_start + m.length - 1} of the text"
        out.print(f"  chunk {m.chunk:03d} row {m.row} positions {m.col}..{m.col + m.length - 1}{part}{when}"
                  f"  documents: {docs}")
    if res.matches and not res.exact:
        out.print(f"  the run: {escape(repr(res.matches[0].text))}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from llm360.data.inspect import view_batch, view_chunk_row
    from llm360.rundir.data import DATA_ONLY, TRAINED

    if args.what == "chunk":
        cv = view_chunk_row(args.run_dir, args.chunk, args.row, args.global_batch)
        if args.json:
            out.json(cv.to_json())
            return 0
        _print_row(cv.row, args.max_chars)
        _print_notes(cv.notes, cv.place is not None and cv.place.status == TRAINED)
        return 0
    bv = view_batch(args.run_dir, args.step, args.global_batch)
    if args.json:
        out.json(bv.to_json())
        return 0
    t = bv.trained
    of_run = "the run's" if t.status != DATA_ONLY else f"the run's is {bv.run_global_batch}"
    out.print(f"[bold]step {t.step}[/]: chunk {t.chunk:03d}, step {t.step_in_chunk} of the chunk, positions "
              f"{t.where.row_start}..{t.where.row_end - 1} of its training order; global batch "
              f"{bv.global_batch} ({of_run})")
    if not t.trained:
        out.print("[bold red]not trained[/]" if t.status != DATA_ONLY else "[bold yellow]data only[/]")
    _print_notes(bv.notes, t.trained)
    for v in bv.rows:
        _print_row(v, args.max_chars)
    return 0


def cmd_export_data(args: argparse.Namespace) -> int:
    from llm360.data.export import export_llm360_jsonl
    from llm360.rundir.layout import RunDir

    dest = args.out or str(RunDir(args.run_dir).llm360_export)
    with _executor(args) as ex:
        files = export_llm360_jsonl(RunDir(args.run_dir).data, dest, executor=ex)
    out.print(f"wrote {len(files)} files to {escape(dest)}; re-import with `llm360 prepare {escape(dest)}/import.yaml "
              "--run-dir NEW_RUN`")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from llm360.train.loop import train

    cfg = _load_config(args)
    summary = train(cfg, args.run_dir, init_from=args.init_from, data_dir=args.data,
                    reset_optimizer=args.reset_optimizer, device=args.device)
    if summary["done"]:
        out.print(
            f"[green]training complete[/]: {summary['step']} steps, {summary['tokens_seen']:,} tokens, "
            f"checkpoints in {escape(str(args.run_dir))}/checkpoints"
            + (f"; skipped steps {summary['skipped_steps']}" if summary["skipped_steps"] else "")
            + (f"; skipped chunks {summary['skipped_chunks']}" if summary["skipped_chunks"] else "")
        )
    else:
        out.print(f"training stopped at step {summary['step']} of {summary['total_steps']}; checkpoints in "
                  f"{escape(str(args.run_dir))}/checkpoints")
    return 0


def _amount(text: str, what: str, units: dict[str, float], example: str) -> float:
    """A positive amount with an optional unit suffix (``80GB``, ``141GiB``, ``1.26T``; none: the "" unit)."""
    t = text.strip().replace(" ", "")
    unit = next((u for u in sorted(units, key=len, reverse=True) if u and t.lower().endswith(u.lower())), "")
    try:
        value = float(t[: len(t) - len(unit)]) * units[unit]
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise ConfigError(f"{what} {text!r}: expected a positive amount such as {example} "
                          f"(units {', '.join(u for u in units if u)})")
    return value


def cmd_plan(args: argparse.Namespace) -> int:
    from llm360.rundir.data import DataStore
    from llm360.rundir.layout import RunDir
    from llm360.train.plan import DEFAULT_PEAK_TFLOPS, Cluster, plan

    cfg = _load_config(args)
    mem = _amount(args.gpu_memory, "--gpu-memory", {"GB": 1e9, "G": 1e9, "GiB": 2**30, "MB": 1e6, "": 1e9}, "80GB")
    tokens = None
    if args.tokens is not None:
        tokens = int(_amount(args.tokens, "--tokens", {"T": 1e12, "B": 1e9, "M": 1e6, "": 1.0}, "1.26T"))
    elif args.run_dir is not None and RunDir(args.run_dir).manifest.is_file():
        store = DataStore(RunDir(args.run_dir).data)
        tokens = store.step_index(cfg.train.global_batch_sequences).total_steps * \
            cfg.train.global_batch_sequences * store.seq_len
    if not 0 < args.mfu <= 1:
        raise ConfigError(f"--mfu {args.mfu}: expected a fraction in (0, 1], e.g. 0.40")
    peak = args.peak_tflops or cfg.train.peak_tflops or DEFAULT_PEAK_TFLOPS
    cluster = Cluster(gpus=args.gpus, gpus_per_node=args.gpus_per_node or min(args.gpus, 8),
                      gpu_memory_bytes=int(mem), mfu=args.mfu, peak_tflops=peak, write_gbps=args.write_gbps)
    p = plan(cfg, cluster, tokens=tokens)
    code = EXIT_OK if p.fits else EXIT_CHECK_FAILED
    if args.json:
        out.json(p.to_json())
        return code
    table = Table(title=f"{escape(p.model['name'])} ({p.model['parameters'] / 1e9:.2f}B parameters) on {args.gpus} x "
                        f"{mem / 1e9:.0f} GB: {escape(p.layout['describe'])}")
    table.add_column("per GPU / run")
    table.add_column("estimate", justify="right")
    for what, value in p.rows():
        table.add_row(escape(what), escape(value))
    out.table(table)
    style = "green" if p.fits else "bold red"
    out.print(f"[{style}]{escape(p.advice)}[/]")
    return code


def _validated(cls, raw: dict):
    """cls.model_validate(raw) with a pydantic error turned into the config's ConfigError message."""
    from pydantic import ValidationError

    from llm360.config.base import format_validation_error

    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, cls, raw)) from None


def _fanout_flags(p: argparse.ArgumentParser, what: str) -> None:
    """--executor, --workers, --gpus-per-task, --ray-address, --shard of a command whose items are tasks."""
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help=f"who runs the {what}: this machine (local) or a Ray cluster (ray)")
    p.add_argument("--workers", type=_POSITIVE, default=1,
                   help=f"{what} at once (local: worker processes, 1 = in this process; ray: at most this many)")
    p.add_argument("--gpus-per-task", type=float, default=0.0, metavar="G",
                   help=f"GPUs Ray gives each of the {what} (e.g. 1)")
    p.add_argument("--ray-address", metavar="ADDR", help="Ray cluster: auto (this node's), HOST:PORT or ray://HOST:PORT "
                   "(default with --executor ray: a local instance)")
    p.add_argument("--shard", metavar="I/N", help=f"only every N-th of the {what}, from I (a Slurm array: "
                   "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT); results merge in the summary")


def _fanout(args: argparse.Namespace) -> dict:
    return {"executor": args.executor, "workers": args.workers, "gpus_per_task": args.gpus_per_task,
            "ray_address": args.ray_address, "shard": args.shard}


def _eval_json(result) -> dict:
    return {
        "columns": result.columns, "headline_columns": result.headline_columns(), "rows": result.rows,
        "tasks": result.tasks, "computed": [list(p) for p in result.computed],
        "failed": [{"checkpoint": f.checkpoint, "task": f.task, "message": f.message} for f in result.failed],
        "unavailable": result.unavailable, "skipped": result.skipped, "interrupted": result.interrupted,
    }  # fmt: skip


def cmd_eval(args: argparse.Namespace) -> int:
    from llm360.eval import EvalConfig, evaluate

    cfg = _load_config(args).eval
    flags = {"batch_size": args.batch_size, "device": args.device, "limit": args.limit,
             "checkpoints": args.checkpoints}
    if any(v is not None for v in flags.values()):
        cfg = _validated(EvalConfig, {**cfg.model_dump(), **{k: v for k, v in flags.items() if v is not None}})
    result = evaluate(args.run_dir, args.tasks, cfg, watch=args.watch, **_fanout(args))
    code = EXIT_INTERRUPTED if result.interrupted else (EXIT_CHECK_FAILED if result.failed else EXIT_OK)
    if args.json:
        out.json(_eval_json(result))
        return code
    if result.rows:
        columns = result.headline_columns()
        table = Table(title=f"{escape(str(args.run_dir))}/eval: one metric per task (all in summary.csv)")
        table.add_column("checkpoint")
        table.add_column("step", justify="right")
        for col in columns:
            task, _, metric = col.rpartition("/")
            table.add_column(f"{escape(task)}\n{escape(metric)}", justify="right", overflow="fold")
        for row in result.rows[-args.show :]:
            cells = [escape(str(row["checkpoint"])), "" if row["step"] is None else str(row["step"])]
            table.add_row(*cells, *["" if row[c] is None else f"{row[c]:.4g}" for c in columns])
        out.table(table)
        if len(result.rows) > args.show:
            out.print(f"(the last {args.show} of {len(result.rows)} checkpoints; --show N for more)")
    for task, why in result.unavailable.items():
        out.print(f"[yellow]not run[/] {escape(task)}: {escape(why)}")
    for item in result.failed:
        out.print(f"[red]failed[/] {escape(item.checkpoint)} / {escape(item.task)}: {escape(item.message)}")
    out.print(f"{len(result.computed)} new result(s) in {escape(str(args.run_dir))}/eval")
    return code


def cmd_analyze(args: argparse.Namespace) -> int:
    cfg = _load_config(args).analysis
    if args.what == "memorization":
        from llm360.analysis.memorization import analyze_memorization

        res = analyze_memorization(args.run_dir, cfg.memorization, checkpoints=args.checkpoints, force=args.force,
                                   **_fanout(args))
    else:
        from llm360.analysis.contamination import analyze_contamination

        res = analyze_contamination(args.run_dir, cfg.contamination, tasks=args.tasks, force=args.force,
                                    executor=args.executor, workers=args.workers, ray_address=args.ray_address)
    code = EXIT_OK if res.ok else EXIT_CHECK_FAILED
    if args.json:
        out.json({"analysis": res.analysis, "ok": res.ok, "out_dir": res.out_dir, "summary": res.summary,
                  "computed": res.computed, "reused": res.reused, "failed": res.failed})
        return code
    for item, why in res.failed.items():
        out.print(f"[red]failed[/] {escape(item)}: {escape(why)}")
    out.print(f"{args.what}: {len(res.computed)} computed, {len(res.reused)} already up to date, "
              f"{len(res.failed)} failed; results in {escape(str(res.out_dir))}"
              + (f" (summary {escape(str(res.summary))})" if res.summary else ""))
    return code


def cmd_finetune(args: argparse.Namespace) -> int:
    from llm360.config import load_config
    from llm360.finetune import finetune, finetune_config
    from llm360.rundir.layout import RunDir

    run_cfg = RunDir(args.run_dir).config
    base = getattr(load_config(run_cfg).finetune, args.kind) if run_cfg.is_file() else None
    section = finetune_config(args.kind, base=base, overrides=args.overrides)
    res = finetune(args.kind, args.run_dir, args.base, args.data, section, force=args.force, device=args.device)
    last = res.metrics[-1] if res.metrics else {}
    out.print(f"[green]{args.kind} done[/]: {res.steps} steps, final loss "
              f"{last.get('loss', float('nan')):.4f}; model in {escape(str(res.folder))}")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    from llm360.release.build import release
    from llm360.rundir.layout import RunDir

    dest = args.out or str(RunDir(args.run_dir).release_default)
    release(args.run_dir, dest, force=args.force, link=not args.copy, threads=args.threads)
    out.print(f"[green]release written[/] to {escape(dest)} (MODEL_CARD.md, SHA256SUMS); check it with "
              f"`llm360 verify {escape(dest)}`")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from llm360.release.verify import verify

    source_paths: dict[str, list[str]] = {}
    for item in args.source or []:
        name, eq, paths = item.partition("=")
        if not (eq and name.strip() and paths.strip()):
            raise ConfigError(f"--source {item!r}: expected NAME=PATH or NAME=PATH,PATH (e.g. --source web=/data/web)")
        source_paths[name.strip()] = [p for p in paths.split(",") if p]
    if source_paths and not args.rederive:
        raise ConfigError("--source only applies with --rederive")
    with _executor(args) as ex:
        rep = verify(args.release, replay=args.replay or [], rederive_data=args.rederive, source_paths=source_paths,
                     threads=args.threads, executor=ex, replay_dir=args.replay_dir)
    if rep.secondary:  # under torchrun: rank 0 reports
        return EXIT_OK
    code = EXIT_OK if rep.ok else EXIT_CHECK_FAILED
    if args.json:
        out.json({"release": rep.release, "ok": rep.ok, "passed": rep.passed, "problems": rep.problems,
                  "replays": rep.replays})
        return code
    for line in rep.passed:
        out.print(f"[green]ok[/]   {escape(line)}")
    for line in rep.problems:
        out.print(f"[red]FAIL[/] {escape(line)}")
    if rep.ok:
        out.print(f"[bold green]{escape(str(args.release))} verifies[/]")
    else:
        out.print(f"[bold red]{len(rep.problems)} problem(s)[/] in {escape(str(args.release))}")
    return code


def cmd_report(args: argparse.Namespace) -> int:
    from llm360.report import build_report

    page = build_report(Path(args.run_dir), Path(args.out) if args.out else None)
    out.print(f"[green]report written[/] to {escape(str(page))} (self-contained, opens offline)")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from llm360.config import to_yaml

    out.write(to_yaml(_load_config(args)))
    return 0


def cmd_config_fields(args: argparse.Namespace) -> int:
    from llm360.config import field_docs

    rows = [(k, d, doc) for k, d, doc in field_docs() if k.startswith(args.prefix or "")]
    if args.json:
        out.json([{"key": k, "default": d, "meaning": doc} for k, d, doc in rows])
        return 0
    if not out.is_terminal:  # one line per field: grep, cut and sort read it as it is
        out.write("".join(f"{k}\t{d}\t{doc}\n" for k, d, doc in rows))
        return 0
    table = Table(title="config fields (set with --set KEY=VALUE or in a YAML file)")
    for col in ("key", "default", "meaning"):
        table.add_column(col, overflow="fold")
    for key, default, doc in rows:
        table.add_row(escape(key), escape(default), escape(doc))
    out.table(table)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from llm360.pipeline import run_all

    done = run_all(_load_config(args), Path(args.run_dir), workers=args.workers)
    if args.json:
        out.json({"run_dir": args.run_dir, "stages": done})
        return 0
    table = Table(title=f"llm360 run: {escape(str(args.run_dir))}")
    table.add_column("stage")
    table.add_column("result")
    for stage, result in done.items():
        table.add_row(escape(stage), escape(result))
    out.table(table)
    return 0


# ------------------------------------------------------------------------------ parser


def _count(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum (a usage error, exit code 2, otherwise)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its message
    return parse


_INDEX, _POSITIVE = _count(0), _count(1)


def _add_executor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="where the tasks run: local worker processes, or a Ray cluster (the result never depends on it)")
    p.add_argument("--workers", type=_POSITIVE, default=None,
                   help="local: worker processes (default 1: in this process); ray: at most this many tasks at once")
    p.add_argument("--ray-address", help="with --executor ray: the cluster (HOST:PORT, ray://HOST:PORT or auto; "
                   "default: a new local Ray instance)")


def _executor(args: argparse.Namespace):
    from llm360.executor import make_executor

    return make_executor(args.executor, args.workers, args.ray_address)


def _json_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", action="store_true", help=f"{what} as one JSON document on stdout (nothing else there)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm360", description="Fully transparent LLM pretraining.")
    p.add_argument("--version", action="version", version=f"llm360 {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, **kwargs)

    sp = command("prepare", help="sources -> tokenizer -> permuted chunks + manifest")
    _add_config_args(sp)
    sp.add_argument("--run-dir", required=True, help="run directory (data goes to RUN_DIR/data)")
    _add_executor_args(sp)
    sp.add_argument("--scratch-dir", help="where the map and scatter outputs go while preparing (default "
                    "RUN_DIR/.prepare; on a cluster a folder every node sees)")
    sp.add_argument("--force", action="store_true", help="rebuild data that differs from this config")
    sp.set_defaults(func=cmd_prepare)

    sp = command("inspect", help="show the text the model saw, and where and when it saw a document or a text")
    isub = sp.add_subparsers(dest="what", required=True)
    ic = isub.add_parser("chunk", help="one row of a chunk file, and the step at which the run trained it")
    ic.add_argument("--run-dir", required=True, help="run directory or release folder")
    ic.add_argument("--chunk", type=_INDEX, required=True)
    ic.add_argument("--row", type=_INDEX, required=True, help="row in the chunk file (data/chunk_NNN.npy)")
    ic.add_argument("--global-batch", type=_POSITIVE, help="sequences per step (default: the run's)")
    ic.add_argument("--max-chars", type=_INDEX, default=2000)
    _json_flag(ic, "the row and where it was trained")
    ic.set_defaults(func=cmd_inspect)
    ib = isub.add_parser("batch", help="every row the model trained on at one global step, after guard decisions")
    ib.add_argument("--run-dir", required=True, help="run directory or release folder")
    ib.add_argument("--step", type=_INDEX, required=True)
    ib.add_argument("--global-batch", type=_POSITIVE, help="sequences per step (default: the run's; another value "
                    "explores the data at that batch, in file order)")
    ib.add_argument("--max-chars", type=_INDEX, default=400)
    _json_flag(ib, "the step's status and rows")
    ib.set_defaults(func=cmd_inspect)
    idoc = isub.add_parser("doc", help="one input document: used, held out or rejected, and every chunk, row, step "
                           "and checkpoint that trained its tokens")
    idoc.add_argument("source", help="the document's source (its documents table, data/documents/SOURCE.jsonl.gz)")
    idoc.add_argument("id", help="the document's id as the manifest and `inspect chunk` show it (e.g. "
                      "web/part-3.jsonl:1207), or its number in the documents table")
    idoc.add_argument("--run-dir", required=True, help="run directory or release folder")
    idoc.add_argument("--global-batch", type=_POSITIVE, help="sequences per step (default: the run's)")
    idoc.add_argument("--max-spans", type=_POSITIVE, default=50, help="spans listed (all of them with --json)")
    _json_flag(idoc, "the document's record and every span with where it was trained")
    idoc.set_defaults(func=cmd_inspect_doc)
    ifind = isub.add_parser("find", help="the training rows holding a text (as the run's tokens): steps, documents "
                            "and first checkpoint; else the rows holding its longest run of tokens")
    ifind.add_argument("text", nargs="?", help="the text to find (or --file)")
    ifind.add_argument("--file", help="read the text to find from this UTF-8 file")
    ifind.add_argument("--run-dir", required=True, help="run directory or release folder")
    ifind.add_argument("--global-batch", type=_POSITIVE, help="sequences per step (default: the run's)")
    ifind.add_argument("--max-matches", type=_POSITIVE, default=100, help="occurrences listed (all are counted)")
    _json_flag(ifind, "the text's tokens and every match with where it was trained")
    ifind.set_defaults(func=cmd_inspect_find)

    sp = command("export-data", help="write chunks in LLM360's released JSONL format")
    sp.add_argument("--run-dir", required=True)
    sp.add_argument("--format", choices=["llm360-jsonl"], default="llm360-jsonl")
    sp.add_argument("--out", help="output folder (default RUN_DIR/export/llm360-jsonl)")
    _add_executor_args(sp)
    sp.set_defaults(func=cmd_export_data)

    sp = command("train", help="train chunk by chunk; resumes from the latest complete checkpoint")
    _add_config_args(sp)
    sp.add_argument("--run-dir", required=True)
    sp.add_argument("--init-from", help="start a new run from this checkpoint folder (weights, and optimizer "
                    "unless --reset-optimizer)")
    sp.add_argument("--data", help="train on this run or data directory instead of RUN_DIR/data")
    sp.add_argument("--reset-optimizer", action="store_true", help="with --init-from: fresh AdamW state")
    sp.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    sp.set_defaults(func=cmd_train)

    sp = command("plan", help="memory per GPU, the smallest layout that fits, checkpoint size and time, run time")
    _add_config_args(sp)
    sp.add_argument("--gpus", type=_POSITIVE, required=True, help="GPUs (ranks) in all")
    sp.add_argument("--gpus-per-node", type=_POSITIVE, help="GPUs of one node (default: 8, or --gpus if fewer)")
    sp.add_argument("--gpu-memory", default="80GB", help="memory of one GPU: 80GB (1e9 bytes), 141GiB, ... "
                    "(default 80GB)")
    sp.add_argument("--mfu", type=float, default=0.40, help="model FLOPs utilisation for the run's time (default 0.40)")
    sp.add_argument("--peak-tflops", type=float, help="dense bf16 peak of one GPU (default: train.peak_tflops, "
                    "else 989, an H100/H200 SXM)")
    sp.add_argument("--write-gbps", type=float, default=2.0, help="checkpoint write rate of one rank, GB/s "
                    "(default 2)")
    sp.add_argument("--tokens", help="tokens of the whole run, e.g. 1.26T (default: the prepared data of "
                    "--run-dir, else the paper's for its presets)")
    sp.add_argument("--run-dir", help="a run directory: its config (when no CONFIG is given) and prepared data")
    _json_flag(sp, "the plan (fits, per_gpu_bytes, memory, smallest_fitting, checkpoint, throughput)")
    sp.set_defaults(func=cmd_plan)

    sp = command("eval", help="evaluate every complete checkpoint (perplexity, lm-eval tasks), incrementally")
    _add_config_args(sp, positional=False)
    sp.add_argument("--run-dir", required=True)
    sp.add_argument("--tasks", nargs="+", metavar="TASK", help="perplexity, presets openllm / code / demo, lm-eval "
                    "task names (name:N for N-shot) or task .yaml files (default: the config's eval.tasks)")
    sp.add_argument("--watch", action="store_true",
                    help="keep evaluating checkpoints as training writes them, until it is finished (Ctrl-C stops); "
                    "with --workers N, N watchers that each take a checkpoint no other has taken")
    sp.add_argument("--checkpoints", nargs="+", metavar="CKPT", help="only these checkpoints (ckpt_003 or 3)")
    sp.add_argument("--batch-size", type=_POSITIVE, help="sequences per forward pass (eval.batch_size)")
    sp.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    sp.add_argument("--limit", type=_POSITIVE, help="only the first N examples of each lm-eval task (quick checks)")
    sp.add_argument("--show", type=_POSITIVE, default=20, help="checkpoints shown in the console table")
    _fanout_flags(sp, "(checkpoint, task) pairs")
    _json_flag(sp, "the summary over every checkpoint and what this call did")
    sp.set_defaults(func=cmd_eval)

    sp = command("analyze", help="Analysis360: memorization over checkpoints, contamination of eval sets")
    asub = sp.add_subparsers(dest="what", required=True)
    am = asub.add_parser("memorization", help="the paper's memorization score of every checkpoint on every chunk")
    _add_config_args(am, positional=False)
    am.add_argument("--run-dir", required=True)
    am.add_argument("--checkpoints", nargs="+", metavar="CKPT", help="only these checkpoints (e.g. ckpt_003)")
    am.add_argument("--force", action="store_true", help="recompute results made with other settings")
    _fanout_flags(am, "checkpoints")
    _json_flag(am, "what was computed, reused or failed")
    am.set_defaults(func=cmd_analyze)
    ac = asub.add_parser("contamination", help="n-gram overlap of evaluation sets with the training chunks")
    _add_config_args(ac, positional=False)
    ac.add_argument("--run-dir", required=True)
    ac.add_argument("--tasks", nargs="+", metavar="TASK",
                    help="JSONL files, lm-eval task names or task YAML files (default: analysis.contamination.tasks)")
    ac.add_argument("--force", action="store_true", help="recompute results made with other settings")
    ac.add_argument("--executor", choices=["local", "ray"], default="local",
                    help="who scans the training chunks: local processes or a Ray cluster (the evaluation n-grams "
                         "are built once here and shared)")
    ac.add_argument("--workers", type=_POSITIVE, help="scan processes (local; default analysis.contamination.workers) "
                    "or blocks at once (ray)")
    ac.add_argument("--ray-address", metavar="ADDR", help="Ray cluster: auto, HOST:PORT or ray://HOST:PORT")
    _json_flag(ac, "what was computed, reused or failed")
    ac.set_defaults(func=cmd_analyze)

    sp = command("finetune", help="SFT or DPO (TRL) from any checkpoint, lineage kept")
    fsub = sp.add_subparsers(dest="kind", required=True)
    for kind, what in (("sft", "supervised fine-tuning (AmberChat recipe)"), ("dpo", "DPO (AmberSafe recipe)")):
        fp = fsub.add_parser(kind, help=what)
        fp.add_argument("--run-dir", required=True)
        fp.add_argument("--from", dest="base", required=True,
                        help="checkpoint: ckpt_012, 12, latest, a fine-tuned model's name, or a path")
        fp.add_argument("--data", required=True,
                        help="JSONL/Parquet file, or builtin:instructions / builtin:preferences")
        fp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a fine-tuning field, e.g. --set lr=1e-4")
        fp.add_argument("--force", action="store_true", help="replace an existing output folder")
        fp.add_argument("--device", choices=["cpu", "cuda"])
        fp.set_defaults(func=cmd_finetune, preset=None)

    sp = command("release", help="assemble a verifiable release: data, checkpoints, metrics, card, SHA256SUMS")
    sp.add_argument("--run-dir", required=True)
    sp.add_argument("--out", help="release folder (default RUN_DIR/release)")
    sp.add_argument("--force", action="store_true", help="replace an existing release folder")
    sp.add_argument("--copy", action="store_true", help="copy files instead of hard-linking them")
    sp.add_argument("--threads", type=_POSITIVE, help="files hashed at once (default: min(4, CPU cores))")
    sp.set_defaults(func=cmd_release)

    sp = command("verify", help="check a release: checksums, completeness, replay chunks, rederive data")
    sp.add_argument("release", help="release folder")
    sp.add_argument("--replay", type=_INDEX, nargs="+", metavar="I",
                    help="re-train chunk I from ckpt_{I-1} and compare (under torchrun: with the run's layout, "
                         "on the ranks torchrun starts)")
    sp.add_argument("--replay-dir", help="where replays re-train (default: a temporary folder; under torchrun on "
                                         "several nodes a folder every node sees)")
    sp.add_argument("--rederive", action="store_true", help="rebuild the data from the raw sources and compare")
    sp.add_argument("--source", action="append", metavar="NAME=PATH[,PATH]",
                    help="with --rederive: read source NAME from these paths (a local copy of its raw files) "
                         "instead of the config's paths or the release's snapshot; repeatable")
    sp.add_argument("--threads", type=_POSITIVE, help="files hashed at once (default: min(4, CPU cores))")
    _add_executor_args(sp)
    _json_flag(sp, "the verdict: ok, every check passed and every problem")
    sp.set_defaults(func=cmd_verify)

    sp = command("report", help="one self-contained HTML page: transparency table, data, curves, evals, analyses")
    sp.add_argument("--run-dir", required=True, help="run directory or release folder")
    sp.add_argument("--out", help="output file (default RUN_DIR/report/index.html)")
    sp.set_defaults(func=cmd_report)

    sp = command("config", help="show the resolved config with every field documented")
    csub = sp.add_subparsers(dest="what", required=True)
    cs = csub.add_parser("show", help="the resolved config as YAML, every field after its meaning")
    _add_config_args(cs)
    cs.set_defaults(func=cmd_config_show)
    cf = csub.add_parser("fields", help="every config field: key, default and meaning (tab-separated when piped)")
    cf.add_argument("prefix", nargs="?", help="only keys starting with this, e.g. train.guards")
    _json_flag(cf, "the fields (key, default, meaning)")
    cf.set_defaults(func=cmd_config_fields)

    sp = command("run", help="every stage, in order, on one run directory")
    _add_config_args(sp)
    sp.add_argument("--run-dir", required=True)
    sp.add_argument("--workers", type=_POSITIVE, default=1)
    _json_flag(sp, "what each stage did")
    sp.set_defaults(func=cmd_run)
    _with_exit_codes(p)
    return p


def _with_exit_codes(parser: argparse.ArgumentParser) -> None:
    """Every command's --help ends with the exit codes."""
    parser.epilog = EXIT_CODES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _with_exit_codes(child)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (see :data:`EXIT_CODES`), never raises for a user's mistake.

    Results are written to the ``sys.stdout`` of the call; anything else that writes to
    ``sys.stdout`` while the command runs (a library's print) goes to stderr instead, so stdout
    holds the result only.
    """
    global out

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (argparse printed why)
        return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_USAGE)
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(verbose=args.verbose, show_progress=not args.no_progress and rank == 0)
    if rank != 0:
        logging.getLogger("llm360").setLevel(logging.WARNING)
    with contextlib.ExitStack() as stack:
        # one answer per command: under torchrun, rank 0's
        stream = sys.stdout if rank == 0 else stack.enter_context(open(os.devnull, "w", encoding="utf-8"))
        out = Results(stream)
        try:
            with contextlib.redirect_stdout(sys.stderr):
                return int(args.func(args) or 0)
        except Llm360Error as e:
            console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            return e.exit_code
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: nothing half-written is kept; run the same command to resume")
            return EXIT_INTERRUPTED
    return EXIT_OK  # not reached: the block returns


if __name__ == "__main__":
    sys.exit(main())
