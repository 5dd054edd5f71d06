"""The `llm360` command: parse arguments, call one stage, show the result.

Stages live in their modules; this file only parses, calls and prints. A user mistake
(:class:`~llm360.errors.Llm360Error`) is printed as one clear message with exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from llm360 import __version__
from llm360.errors import ConfigError, Llm360Error
from llm360.log import console, setup_logging

logger = logging.getLogger("llm360.cli")

Handler = Callable[[argparse.Namespace], int]


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


def _run_config(run_dir: Path, args: argparse.Namespace):
    """The config of an existing run directory, with any --set overrides applied."""
    from llm360.config import load_config
    from llm360.rundir.layout import RunDir

    path = RunDir(run_dir).config
    if getattr(args, "config", None):
        return _load_config(args)
    if not path.is_file():
        raise Llm360Error(f"{path} not found: run `llm360 prepare --run-dir {run_dir}` first")
    return load_config(path, overrides=getattr(args, "overrides", []))


# ----------------------------------------------------------------------------- commands


def cmd_prepare(args: argparse.Namespace) -> int:
    from llm360.data.prepare import prepare

    cfg = _load_config(args)
    res = prepare(cfg, args.run_dir, workers=args.workers, force=args.force)
    m = res.manifest
    if not res.built:
        console.print(f"[green]data is up to date[/] in {args.run_dir}/data — nothing to do")
        return 0
    table = Table(title=f"prepared {m['num_chunks']} chunks into {args.run_dir}/data")
    for col in ("source", "docs in", "used", "rejected", "train tokens", "valid rows"):
        table.add_column(col, justify="right" if col != "source" else "left")
    for name, s in m["sources"].items():
        rej = ", ".join(f"{k}: {v}" for k, v in s["documents_rejected"].items()) or "0"
        table.add_row(name, str(s["documents_in"]), str(s["documents_used"]), rej,
                      f"{s['tokens_train_documents']:,}", str(s["valid_rows"]))
    console.print(table)
    console.print(f"{m['total_rows']:,} rows x {m['row_length']} tokens = {m['total_tokens']:,} tokens, "
                  f"dtype {m['token_dtype']}, vocab {m['vocab_size']}")
    return 0


def _print_row(view, max_chars: int) -> None:
    spans = ", ".join(
        f"{escape(s['source'])}:{escape(str(s['doc_id']))}@{s['doc_offset']}+{s['length']}" for s in view.spans
    )
    console.print(f"[bold]chunk {view.chunk:03d} row {view.row}[/]  documents: {spans}", soft_wrap=True)
    if view.text is None:
        console.print(escape(str(view.token_ids[:max_chars])), soft_wrap=True)
    else:
        text = view.text if len(view.text) <= max_chars else view.text[:max_chars] + " …"
        console.print(escape(text), highlight=False, soft_wrap=True)


def cmd_inspect(args: argparse.Namespace) -> int:
    from llm360.data.inspect import view_batch, view_row
    from llm360.rundir.data import DataStore
    from llm360.rundir.layout import RunDir

    data = RunDir(args.run_dir).data
    if args.what == "chunk":
        _print_row(view_row(DataStore(data), args.chunk, args.row), args.max_chars)
    else:
        gb = args.global_batch
        if gb is None:
            gb = _run_config(Path(args.run_dir), args).train.global_batch_sequences
        info, rows = view_batch(data, args.step, gb)
        console.print(f"[bold]step {info['step']}[/]: chunk {info['chunk']:03d}, rows "
                      f"{info['rows'][0]}..{info['rows'][1] - 1} (step {info['step_in_chunk']} of the chunk)")
        for v in rows:
            _print_row(v, args.max_chars)
    return 0


def cmd_export_data(args: argparse.Namespace) -> int:
    from llm360.data.export import export_llm360_jsonl
    from llm360.rundir.layout import RunDir

    out = args.out or str(Path(args.run_dir) / "export" / "llm360-jsonl")
    files = export_llm360_jsonl(RunDir(args.run_dir).data, out)
    console.print(f"wrote {len(files)} files to {out}; re-import with `llm360 prepare {out}/import.yaml "
                  "--run-dir NEW_RUN`")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from llm360.train.loop import train

    cfg = _load_config(args)
    summary = train(cfg, args.run_dir, init_from=args.init_from, data_dir=args.data,
                    reset_optimizer=args.reset_optimizer, device=args.device)
    if summary["done"]:
        console.print(
            f"[green]training complete[/]: {summary['step']} steps, {summary['tokens_seen']:,} tokens, "
            f"checkpoints in {args.run_dir}/checkpoints"
            + (f"; skipped steps {summary['skipped_steps']}" if summary["skipped_steps"] else "")
            + (f"; skipped chunks {summary['skipped_chunks']}" if summary["skipped_chunks"] else "")
        )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from llm360.eval import EvalConfig, evaluate

    cfg = _load_config(args).eval
    flags = {"batch_size": args.batch_size, "device": args.device, "limit": args.limit,
             "checkpoints": args.checkpoints}
    if any(v is not None for v in flags.values()):
        cfg = EvalConfig.model_validate({**cfg.model_dump(), **{k: v for k, v in flags.items() if v is not None}})
    result = evaluate(args.run_dir, args.tasks, cfg, watch=args.watch)
    if result.rows:
        columns = result.headline_columns()
        table = Table(title=f"{args.run_dir}/eval: one metric per task (all in summary.csv)")
        table.add_column("checkpoint")
        table.add_column("step", justify="right")
        for col in columns:
            task, _, metric = col.rpartition("/")
            table.add_column(f"{task}\n{metric}", justify="right", overflow="fold")
        for row in result.rows[-args.show :]:
            cells = [row["checkpoint"], "" if row["step"] is None else str(row["step"])]
            table.add_row(*cells, *["" if row[c] is None else f"{row[c]:.4g}" for c in columns])
        console.print(table)
        if len(result.rows) > args.show:
            console.print(f"(the last {args.show} of {len(result.rows)} checkpoints; --show N for more)")
    for task, why in result.unavailable.items():
        console.print(f"[yellow]not run[/] {escape(task)}: {escape(why)}", highlight=False)
    for item in result.failed:
        console.print(f"[red]failed[/] {item.checkpoint} / {escape(item.task)}: {escape(item.message)}",
                      highlight=False)
    console.print(f"{len(result.computed)} new result(s) in {args.run_dir}/eval")
    return 130 if result.interrupted else (1 if result.failed else 0)


def cmd_analyze(args: argparse.Namespace) -> int:
    cfg = _load_config(args).analysis
    if args.what == "memorization":
        from llm360.analysis.memorization import analyze_memorization

        res = analyze_memorization(args.run_dir, cfg.memorization, checkpoints=args.checkpoints, force=args.force)
    else:
        from llm360.analysis.contamination import analyze_contamination

        res = analyze_contamination(args.run_dir, cfg.contamination, tasks=args.tasks, force=args.force)
    for item, why in res.failed.items():
        console.print(f"[red]failed[/] {escape(item)}: {escape(why)}", highlight=False, soft_wrap=True)
    console.print(f"{args.what}: {len(res.computed)} computed, {len(res.reused)} already up to date, "
                  f"{len(res.failed)} failed; results in {res.out_dir}"
                  + (f" (summary {res.summary})" if res.summary else ""), soft_wrap=True)
    return 0 if res.ok else 1


def cmd_finetune(args: argparse.Namespace) -> int:
    from llm360.config import load_config
    from llm360.finetune import finetune, finetune_config
    from llm360.rundir.layout import RunDir

    run_cfg = RunDir(args.run_dir).config
    base = getattr(load_config(run_cfg).finetune, args.kind) if run_cfg.is_file() else None
    section = finetune_config(args.kind, base=base, overrides=args.overrides)
    res = finetune(args.kind, args.run_dir, args.base, args.data, section, force=args.force, device=args.device)
    last = res.metrics[-1] if res.metrics else {}
    console.print(f"[green]{args.kind} done[/]: {res.steps} steps, final loss "
                  f"{last.get('loss', float('nan')):.4f}; model in {res.folder}")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    from llm360.release.build import release

    out = args.out or str(Path(args.run_dir) / "release")
    release(args.run_dir, out, force=args.force, link=not args.copy)
    console.print(f"[green]release written[/] to {out} (MODEL_CARD.md, SHA256SUMS); check it with "
                  f"`llm360 verify {out}`")
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
    rep = verify(args.release, replay=args.replay or [], rederive_data=args.rederive, source_paths=source_paths)
    for line in rep.passed:
        console.print(f"[green]ok[/]   {escape(line)}", highlight=False, soft_wrap=True)
    for line in rep.problems:
        console.print(f"[red]FAIL[/] {escape(line)}", highlight=False, soft_wrap=True)
    if rep.ok:
        console.print(f"[bold green]{args.release} verifies[/]")
        return 0
    console.print(f"[bold red]{len(rep.problems)} problem(s)[/] in {args.release}")
    return 1


def cmd_report(args: argparse.Namespace) -> int:
    from llm360.report import build_report

    out = build_report(Path(args.run_dir), Path(args.out) if args.out else None)
    console.print(f"[green]report written[/] to {out} (self-contained, opens offline)")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from llm360.config import to_yaml

    sys.stdout.write(to_yaml(_load_config(args)))
    return 0


def cmd_config_fields(args: argparse.Namespace) -> int:
    from llm360.config import field_docs

    table = Table(title="config fields (set with --set KEY=VALUE or in a YAML file)")
    for col in ("key", "default", "meaning"):
        table.add_column(col, overflow="fold")
    for key, default, doc in field_docs():
        if key.startswith(args.prefix or ""):
            table.add_row(key, escape(default), escape(doc))
    console.print(table)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from llm360.pipeline import run_all

    done = run_all(_load_config(args), Path(args.run_dir), workers=args.workers)
    table = Table(title=f"llm360 run: {args.run_dir}")
    table.add_column("stage")
    table.add_column("result")
    for stage, result in done.items():
        table.add_row(stage, escape(result))
    console.print(table)
    return 0


# ------------------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm360", description="Fully transparent LLM pretraining.")
    p.add_argument("--version", action="version", version=f"llm360 {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sp = sub.add_parser("prepare", help="sources -> tokenizer -> permuted chunks + manifest")
    _add_config_args(sp)
    sp.add_argument("--run-dir", required=True, help="run directory (data goes to RUN_DIR/data)")
    sp.add_argument("--workers", type=int, default=1, help="tokenizer processes (the result never depends on it)")
    sp.add_argument("--force", action="store_true", help="rebuild data that differs from this config")
    sp.set_defaults(func=cmd_prepare)

    sp = sub.add_parser("inspect", help="show the text the model saw")
    isub = sp.add_subparsers(dest="what", required=True)
    ic = isub.add_parser("chunk", help="one row of one chunk")
    ic.add_argument("--run-dir", required=True)
    ic.add_argument("--chunk", type=int, required=True)
    ic.add_argument("--row", type=int, required=True)
    ic.add_argument("--max-chars", type=int, default=2000)
    ic.set_defaults(func=cmd_inspect)
    ib = isub.add_parser("batch", help="every row of one global step")
    ib.add_argument("--run-dir", required=True)
    ib.add_argument("--step", type=int, required=True)
    ib.add_argument("--global-batch", type=int, help="sequences per step (default: the run's config)")
    ib.add_argument("--max-chars", type=int, default=400)
    ib.set_defaults(func=cmd_inspect, overrides=[], preset=None)

    sp = sub.add_parser("export-data", help="write chunks in LLM360's released JSONL format")
    sp.add_argument("--run-dir", required=True)
    sp.add_argument("--format", choices=["llm360-jsonl"], default="llm360-jsonl")
    sp.add_argument("--out", help="output folder (default RUN_DIR/export/llm360-jsonl)")
    sp.set_defaults(func=cmd_export_data)

    sp = sub.add_parser("train", help="train chunk by chunk; resumes from the latest complete checkpoint")
    _add_config_args(sp)
    sp.add_argument("--run-dir", required=True)
    sp.add_argument("--init-from", help="start a new run from this checkpoint folder (weights, and optimizer "
                    "unless --reset-optimizer)")
    sp.add_argument("--data", help="train on this run or data directory instead of RUN_DIR/data")
    sp.add_argument("--reset-optimizer", action="store_true", help="with --init-from: fresh AdamW state")
    sp.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("eval", help="evaluate every complete checkpoint (perplexity, lm-eval tasks), incrementally")
    _add_config_args(sp, positional=False)
    sp.add_argument("--run-dir", required=True)
    sp.add_argument("--tasks", nargs="+", metavar="TASK", help="perplexity, presets openllm / code / demo, lm-eval "
                    "task names (name:N for N-shot) or task .yaml files (default: the config's eval.tasks)")
    sp.add_argument("--watch", action="store_true",
                    help="keep evaluating checkpoints as training writes them, until it is finished (Ctrl-C stops)")
    sp.add_argument("--checkpoints", nargs="+", metavar="CKPT", help="only these checkpoints (ckpt_003 or 3)")
    sp.add_argument("--batch-size", type=int, help="sequences per forward pass (eval.batch_size)")
    sp.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    sp.add_argument("--limit", type=int, help="only the first N examples of each lm-eval task (quick checks)")
    sp.add_argument("--show", type=int, default=20, help="checkpoints shown in the console table")
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("analyze", help="Analysis360: memorization over checkpoints, contamination of eval sets")
    asub = sp.add_subparsers(dest="what", required=True)
    am = asub.add_parser("memorization", help="the paper's memorization score of every checkpoint on every chunk")
    _add_config_args(am, positional=False)
    am.add_argument("--run-dir", required=True)
    am.add_argument("--checkpoints", nargs="+", metavar="CKPT", help="only these checkpoints (e.g. ckpt_003)")
    am.add_argument("--force", action="store_true", help="recompute results made with other settings")
    am.set_defaults(func=cmd_analyze)
    ac = asub.add_parser("contamination", help="n-gram overlap of evaluation sets with the training chunks")
    _add_config_args(ac, positional=False)
    ac.add_argument("--run-dir", required=True)
    ac.add_argument("--tasks", nargs="+", metavar="TASK",
                    help="JSONL files, lm-eval task names or task YAML files (default: analysis.contamination.tasks)")
    ac.add_argument("--force", action="store_true", help="recompute results made with other settings")
    ac.set_defaults(func=cmd_analyze)

    sp = sub.add_parser("finetune", help="SFT or DPO (TRL) from any checkpoint, lineage kept")
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

    sp = sub.add_parser("release", help="assemble a verifiable release: data, checkpoints, metrics, card, SHA256SUMS")
    sp.add_argument("--run-dir", required=True)
    sp.add_argument("--out", help="release folder (default RUN_DIR/release)")
    sp.add_argument("--force", action="store_true", help="replace an existing release folder")
    sp.add_argument("--copy", action="store_true", help="copy files instead of hard-linking them")
    sp.set_defaults(func=cmd_release)

    sp = sub.add_parser("verify", help="check a release: checksums, completeness, replay chunks, rederive data")
    sp.add_argument("release", help="release folder")
    sp.add_argument("--replay", type=int, nargs="+", metavar="I", help="re-train chunk I from ckpt_{I-1} and compare")
    sp.add_argument("--rederive", action="store_true", help="rebuild the data from the raw sources and compare")
    sp.add_argument("--source", action="append", metavar="NAME=PATH[,PATH]",
                    help="with --rederive: read source NAME from these paths (a local copy of its raw files) "
                         "instead of the config's paths or the release's snapshot; repeatable")
    sp.set_defaults(func=cmd_verify)

    sp = sub.add_parser("report", help="one self-contained HTML page: transparency table, data, curves, evals, analyses")
    sp.add_argument("--run-dir", required=True, help="run directory or release folder")
    sp.add_argument("--out", help="output file (default RUN_DIR/report/index.html)")
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser("config", help="show the resolved config with every field documented")
    csub = sp.add_subparsers(dest="what", required=True)
    cs = csub.add_parser("show")
    _add_config_args(cs)
    cs.set_defaults(func=cmd_config_show)
    cf = csub.add_parser("fields", help="every config field: key, default and meaning")
    cf.add_argument("prefix", nargs="?", help="only keys starting with this, e.g. train.guards")
    cf.set_defaults(func=cmd_config_fields)

    sp = sub.add_parser("run", help="every stage, in order, on one run directory")
    _add_config_args(sp)
    sp.add_argument("--run-dir", required=True)
    sp.add_argument("--workers", type=int, default=1)
    sp.set_defaults(func=cmd_run)
    return p


def main(argv: list[str] | None = None) -> int:
    import os

    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(verbose=args.verbose, show_progress=not args.no_progress and rank == 0)
    if rank != 0:
        logging.getLogger("llm360").setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except Llm360Error as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: nothing half-written is kept; run the same command to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
