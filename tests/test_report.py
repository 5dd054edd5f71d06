"""`llm360 report`: one self-contained page that shows exactly what the folder holds.

Synthetic run folders (every file written here, in the formats the stages write) check each section
and the transparency table against the files present; a real tiny run (prepare + train, and eval
and analyses when those stages are installed) checks the formats end to end; headless Chromium loads
the page from disk, offline, with no script error, and its screenshot is not blank.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from llm360 import __version__
from llm360.errors import Llm360Error
from llm360.report import build_report

SOURCES = ("web", "code", "<b>books</b>")
EVIL = '<script>alert("x")</script> & "co"'


# ------------------------------------------------------------------------------ synthetic run


def _write_safetensors(path: Path, tensors: dict[str, tuple[int, ...]], dtype: str = "F32") -> None:
    """A valid safetensors file of zeros (the report reads only its header)."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = math.prod(shape) * 4
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def _jsonl(path: Path, records: list, extra_lines: tuple[str, ...] = ()) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")


def _json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def make_run(root: Path, *, chunks: int = 4, steps_per_chunk: int = 15, stages: int = 2) -> Path:
    """A complete run folder: config, data, checkpoints, metrics, events, eval and both analyses."""
    root.mkdir(parents=True, exist_ok=True)
    seq_len, hidden, vocab = 32, 32, 300
    cfg = {
        "name": EVIL, "preset": None,
        "data": {"seq_len": seq_len, "seed": 7, "chunks": chunks, "stages": [],
                 "tokenizer": {"kind": "train", "vocab_size": vocab}},
        "model": {"name": "tiny", "hidden_size": hidden, "num_layers": 2, "num_heads": 2},
        "train": {"seed": 42, "global_batch_sequences": 8, "micro_batch_sequences": 4, "lr": 3e-3, "min_lr": 3e-4,
                  "warmup_steps": 5, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "grad_clip": 1.0,
                  "precision": "fp32", "deterministic": True, "max_chunks": None,
                  "guards": {"nonfinite_policy": "skip_step", "spike_policy": "record"}},
    }  # fmt: skip
    (root / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    chunk_list = []
    per_stage = max(1, chunks // stages)
    for i in range(chunks):
        arr = rng.integers(0, vocab, size=(6, seq_len + 1), dtype=np.uint16)
        np.save(data / f"chunk_{i:03d}.npy", arr)
        np.save(data / f"provenance_{i:03d}.npy", np.zeros(6, dtype=np.int64))
        tps = {s: int(1000 + 300 * j + 50 * i) for j, s in enumerate(SOURCES)}
        chunk_list.append({"index": i, "name": f"{i:03d}", "file": f"chunk_{i:03d}.npy", "rows": 6,
                           "sha256": "0" * 64, "stage": f"s{min(i // per_stage, stages - 1)}",
                           "tokens": sum(tps.values()), "tokens_per_source": tps})  # fmt: skip
    stage_list = [{"index": k, "name": f"s{k}", "first_chunk": k * per_stage,
                   "chunks": per_stage if k < stages - 1 else chunks - k * per_stage, "rows_per_chunk": 6,
                   "mix": [{"source": s, "weight": 1.0, "tokens": 5000} for s in SOURCES]}
                  for k in range(stages)]  # fmt: skip
    manifest = {
        "format": "llm360-data", "version": 1, "num_chunks": chunks, "seq_len": seq_len, "row_length": seq_len + 1,
        "total_rows": 6 * chunks, "total_tokens": sum(c["tokens"] for c in chunk_list), "vocab_size": vocab,
        "token_dtype": "uint16", "seed": 7, "tokenizer_sha256": "ab" * 32,
        "versions": {"llm360": __version__, "python": "3.11"},
        "sources": {s: {"kind": "jsonl", "documents_in": 100 + j, "documents_used": 90 + j,
                        "documents_rejected": {"empty": 4, "too_long": 6} if j == 0 else {},
                        "tokens_train_documents": 5000 + j, "valid_rows": 2}
                    for j, s in enumerate(SOURCES)},
        "chunks": chunk_list, "stages": stage_list,
    }  # fmt: skip
    _json(data / "manifest.json", manifest)
    (data / "sources").mkdir()
    for s in ("web", "code"):
        with gzip.open(data / "sources" / f"{s}.jsonl.gz", "wt") as f:
            f.write(json.dumps({"text": f"a {s} document"}) + "\n")

    total = chunks * steps_per_chunk
    for i in range(-1, chunks):
        name = "init" if i < 0 else f"ckpt_{i:03d}"
        d = root / "checkpoints" / name
        d.mkdir(parents=True)
        shapes = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden),
                  "model.norm.weight": (hidden,)}  # fmt: skip
        _write_safetensors(d / "model.safetensors", shapes)
        _write_safetensors(d / "optimizer.safetensors", {f"exp_avg/{k}": v for k, v in shapes.items()})
        _json(d / "config.json", {"model_type": "llama", "hidden_size": hidden, "intermediate_size": 64,
                                  "num_attention_heads": 2, "num_key_value_heads": 2, "num_hidden_layers": 2,
                                  "vocab_size": vocab, "max_position_embeddings": seq_len, "rms_norm_eps": 1e-6,
                                  "rope_theta": 10000.0, "tie_word_embeddings": False})  # fmt: skip
        _json(d / "trainer_state.json", {"step": (i + 1) * steps_per_chunk, "total_steps": total})
        _json(d / "COMPLETE.json", {"files": {}})

    recs = []
    for step in range(total):
        c = step // steps_per_chunk
        recs.append({"step": step, "chunk": c, "step_in_chunk": step % steps_per_chunk, "tokens_seen": 256 * (step + 1),
                     "loss": 6.0 * math.exp(-step / 30) + 2.0, "grad_norm": 0.5 + 0.1 * (step % 7), "lr": 3e-3 * min(1, step / 5),
                     "tokens_per_s": 20000.0 + step, "step_time_s": 0.01, "rss_mb": 300.0 + step, "mfu": 0.3})  # fmt: skip
    recs[7]["loss"] = "nan"  # what the trainer writes for a non-finite loss
    recs[20]["loss"] = 60.0  # a spike
    _jsonl(root / "metrics" / "train.jsonl", recs, ("{this is not json", "[1, 2, 3]"))
    events = [
        {"event": "skip_step", "step": 7, "chunk": 0, "reason": "non-finite loss", "loss": "nan", "time": 1.7e9},
        {"event": "loss_spike", "step": 20, "chunk": 1, "loss": 60.0, "median": 4.0, "time": 1.7e9 + 5},
        {"event": "resume", "step": 30, "checkpoint": "ckpt_001", "time": 1.7e9 + 60},
        {"event": "rollback_skip_chunk", "step": 45, "chunk": 3, "reason": "<img src=x onerror=alert(1)>",
         "time": 1.7e9 + 90},
        {"event": "rows_unused", "step": 14, "chunk": 0, "rows": 4, "reason": "fewer than a global batch",
         "time": 1.7e9 + 1},
    ]  # fmt: skip
    _jsonl(root / "metrics" / "events.jsonl", events, ("garbage",))

    cols = ["perplexity/overall", "perplexity/web", "arc_challenge_25shot/acc_norm", "arc_challenge_25shot/acc"]
    rows = []
    for i in range(chunks):
        rows.append({"checkpoint": f"ckpt_{i:03d}", "step": (i + 1) * steps_per_chunk, "tokens_seen": 1000 * (i + 1),
                     "perplexity/overall": 80.0 / (i + 1), "perplexity/web": 70.0 / (i + 1),
                     "arc_challenge_25shot/acc_norm": 0.25 + 0.01 * i, "arc_challenge_25shot/acc": 0.24 + 0.01 * i})  # fmt: skip
        _json(root / "eval" / f"ckpt_{i:03d}" / "perplexity.json", {
            "format": "llm360-eval-result", "task": "perplexity", "primary_metric": "overall",
            "metrics": {"overall": 80.0 / (i + 1), "web": 70.0 / (i + 1)}, "step": (i + 1) * steps_per_chunk,
        })  # fmt: skip
    _json(root / "eval" / "summary.json", {
        "format": "llm360-eval-summary", "version": 1, "columns": cols, "rows": rows,
        "tasks": {"perplexity": {"kind": "perplexity", "primary_metric": "overall", "num_fewshot": None},
                  "arc_challenge_25shot": {"kind": "lm-eval", "primary_metric": "acc_norm", "num_fewshot": 25}},
    })  # fmt: skip

    L = 8
    names = [f"ckpt_{i:03d}" for i in range(chunks)]
    mem = root / "analysis" / "memorization"
    dist = {n: {"rows": 10 * (i + 1), "counts": [5, 3, 1, 0, 0, 0, 0, 0, i + 1], "mean": 0.1 + 0.05 * i,
                "extractible": i + 1, "extractible_share": (i + 1) / (10 * (i + 1))} for i, n in enumerate(names)}  # fmt: skip
    _json(mem / "summary.json", {
        "format": "llm360-memorization-summary", "version": 1,
        "settings": {"prompt_tokens": L, "continuation_tokens": L, "rows_per_chunk": 10, "dtype": "float32"},
        "checkpoints": names, "checkpoint_chunk": list(range(chunks)), "num_chunks": chunks,
        "rows_per_chunk": [10] * chunks, "score_values": [j / L for j in range(L + 1)],
        "distribution": dist, "distribution_unseen": dist,
        "per_chunk": {n: {"latest_seen_chunk": i, "mean": [0.1 + 0.02 * (i - c) for c in range(chunks)],
                          "extractible_share": [0.0] * chunks} for i, n in enumerate(names)},
        "correlation": {"score_pearson": [[1.0 if a == b else (None if a == 0 else 0.5) for b in range(chunks)]
                                          for a in range(chunks)]},
    })  # fmt: skip
    for i, n in enumerate(names):
        _json(mem / f"{n}.json", {"format": "llm360-memorization", "checkpoint": n, "chunk": i, "rows": 40,
                                  "mean_score_seen": 0.1 + 0.05 * i, "mean_score_unseen": 0.05,
                                  "extractible_seen": i})  # fmt: skip
    con = root / "analysis" / "contamination"
    for t, share in (("arc_easy", 0.1), ("<i>my_set</i>", 0.9)):
        n_ex = 50
        dirty = int(n_ex * share)
        _json(con / f"{re.sub(r'[^a-z_]', '', t)}.json", {
            "format": "llm360-contamination", "version": 1, "task": t, "source": "jsonl:x.jsonl", "ngram": 13,
            "examples": n_ex, "tokens": 5000, "contaminated_examples": dirty, "contaminated_share": share,
            "contaminated_tokens_share": share * 0.9, "mean_example_contamination": share * 0.8,
            "buckets": {"clean": {"examples": n_ex - dirty, "share": 1 - share},
                        "not_clean": {"examples": dirty, "share": share},
                        "not_dirty": {"examples": n_ex - dirty, "share": 1 - share},
                        "dirty": {"examples": dirty, "share": share}},
            "thresholds": {"clean_below": 0.2, "dirty_at_least": 0.8},
            "first_checkpoint_that_saw_it": "ckpt_000",
            "contaminated_examples_seen_by_checkpoint": [dirty // 2] + [dirty] * (chunks - 1),
            "top_examples": [{"index": 0, "contamination": 1.0, "text": "<script>bad()</script> question",
                              "matched_ngram": "a b c", "first_occurrence": {"checkpoint": "ckpt_000"}}],
        })  # fmt: skip
    return root


# ------------------------------------------------------------------------------------ helpers


def statuses(html: str) -> dict[str, str]:
    return dict(re.findall(r'<tr data-row="([a-z_]+)" data-status="([a-z]+)">', html))


def available(html: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="([a-z]+)" data-available="(yes|no)"', html))


def section(html: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}".*?</section>', html, re.S)
    assert m, f"no section {sid}"
    return m.group(0)


def build(run: Path) -> str:
    return build_report(run).read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------ tests


def test_full_synthetic_run_shows_every_section(tmp_path: Path):
    run = make_run(tmp_path / "run")
    out = build_report(run)
    assert out == run / "report" / "index.html"
    html = out.read_text(encoding="utf-8")
    assert set(available(html).values()) == {"yes"}, available(html)
    assert set(statuses(html).values()) == {"yes"}, statuses(html)
    assert len(statuses(html)) == 10
    # training: chunk boundaries, event marks, the malformed lines counted in a note
    train = section(html, "training")
    assert train.count('class="vline"') >= 3
    assert "loss_spike at step 20" in train and "skip_step at step 7" in train
    assert "metrics/train.jsonl: 2 malformed lines skipped" in html
    assert "metrics/events.jsonl: 1 malformed line skipped" in html
    assert "1 non-finite loss left as gaps" in train
    assert "off the chart" in train  # the spike is clipped and marked, not flattening the curve
    # data mix: a stacked bar per chunk with every source, stage boundary
    data = section(html, "data")
    assert data.count('class="bar"') == 4 * len(SOURCES)
    assert "too_long: 6" in data and "stage s1" in data
    # architecture from config.json + parameters from the safetensors header
    arch = section(html, "architecture")
    assert "19,232" in arch and "RMSNorm" in arch
    assert "<td>parametrization</td><td>standard</td>" in arch.replace(" class=num", "")
    # evaluations: one chart per task/metric, headline first
    ev = section(html, "evaluations")
    assert ev.count('<svg class="chart line"') == 4
    assert "25-shot" in ev
    mem = section(html, "memorization")
    assert mem.count('class="chart bars"') == 4 and 'class="chart heat"' in mem
    assert "latest chunk seen is 2" in mem
    con = section(html, "contamination")
    assert "arc_easy" in con and "90.0%" in con
    assert f"llm360 {__version__}" in html


def test_text_from_files_is_escaped(tmp_path: Path):
    html = build(make_run(tmp_path / "run"))
    assert "<script>alert" not in html and "<img src=x" not in html and "<b>books</b>" not in html
    assert "<script>bad()" not in html and "<i>my_set</i>" not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &quot;co&quot;" in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert html.count("<script>") == 1  # the page's own


def test_page_is_self_contained(tmp_path: Path):
    html = build(make_run(tmp_path / "run"))
    assert not re.search(r"<script[^>]*\bsrc=", html)
    assert not re.search(r"<link\b", html)
    assert not re.search(r"<img\b", html)
    assert "@import" not in html and not re.search(r"url\(\s*['\"]?(https?:)?//", html)
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", html)


@pytest.mark.parametrize(
    ("remove", "expect"),
    [
        ("checkpoints/*/optimizer.safetensors", {"optimizer_checkpoints": "no", "model_checkpoints": "yes"}),
        ("checkpoints/ckpt_001/optimizer.safetensors", {"optimizer_checkpoints": "partial"}),
        ("checkpoints/ckpt_003", {"model_checkpoints": "partial", "evaluations": "yes"}),
        ("checkpoints/ckpt_002/COMPLETE.json", {"model_checkpoints": "partial"}),
        ("checkpoints", {"model_checkpoints": "no", "optimizer_checkpoints": "no"}),
        ("config.yaml", {"training_config": "no", "code": "yes"}),
        ("data/chunk_*.npy", {"data_ordering": "no", "data_available": "yes"}),
        ("data/chunk_001.npy", {"data_ordering": "partial"}),
        ("data/manifest.json", {"data_mix": "no", "code": "no", "data_ordering": "partial"}),
        ("data", {"data_available": "no", "data_ordering": "no", "data_mix": "no"}),
        ("metrics/train.jsonl", {"training_logs": "no"}),
        ("eval", {"evaluations": "no"}),
        ("analysis/memorization", {"analyses": "partial"}),
        ("analysis", {"analyses": "no"}),
    ],
)
def test_transparency_follows_the_files(tmp_path: Path, remove: str, expect: dict[str, str]):
    run = make_run(tmp_path / "run")
    for p in run.glob(remove):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    got = statuses(build(run))
    for row, status in expect.items():
        assert got[row] == status, (row, got)
    assert got["training_logs"] == "yes" or remove.startswith("metrics")  # the rest is left alone


def test_sections_say_why_when_their_data_is_missing(tmp_path: Path):
    run = make_run(tmp_path / "run")
    for name in ("checkpoints", "metrics", "eval", "analysis", "data"):
        shutil.rmtree(run / name)
    html = build(run)
    av = available(html)
    assert av == {"transparency": "yes", "config": "yes", "architecture": "no", "data": "no", "training": "no",
                  "evaluations": "no", "memorization": "no", "contamination": "no"}  # fmt: skip
    assert "not available: no metrics/train.jsonl" in section(html, "training")
    assert "not available: no eval/ folder" in section(html, "evaluations")
    assert "not available: no data/manifest.json" in section(html, "data")
    assert 'class="chart' not in html


def test_empty_folder_gives_a_page_of_noes(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    html = build(tmp_path / "empty")
    assert set(statuses(html).values()) == {"no"}
    assert available(html)["transparency"] == "yes"
    assert html.count('<p class="na">not available:') == 7
    assert "<h1>empty</h1>" in html  # no config: the folder's name


def test_malformed_files_are_notes_never_crashes(tmp_path: Path):
    run = make_run(tmp_path / "run")
    (run / "config.yaml").write_text("name: [unclosed\n")
    (run / "data" / "manifest.json").write_text("{ not json")
    (run / "metrics" / "train.jsonl").write_text("garbage\n\n{\"no_step\": 1}\n")
    (run / "metrics" / "events.jsonl").write_bytes(b"\xff\xfe\x00binary\n")
    (run / "eval" / "summary.json").write_text("[1, 2]")
    (run / "analysis" / "memorization" / "summary.json").write_text("{}")
    (run / "analysis" / "contamination" / "arc_easy.json").write_text('"just a string"')
    (run / "checkpoints" / "ckpt_003" / "model.safetensors").write_bytes(b"\x01\x02")
    (run / "checkpoints" / "ckpt_003" / "config.json").write_text("{")
    html = build(run)
    av = available(html)
    assert av["config"] == "no" and av["data"] == "no" and av["training"] == "no"
    assert av["evaluations"] == "yes"  # from the per-checkpoint files
    assert "eval/ckpt_*/&lt;task&gt;.json" in html
    assert av["memorization"] == "yes"  # per-checkpoint results, without the summary's figures
    assert "summary.json is missing" in section(html, "memorization")
    assert av["contamination"] == "yes"  # the other task
    notes = html[html.index("<footer>") :]
    for text in ("config.yaml is unreadable", "data/manifest.json is unreadable", "1 malformed line skipped",
                 "model.safetensors: header unreadable", "is not a contamination result",
                 "ckpt_003/config.json is unreadable"):  # fmt: skip
        assert text in notes, text
    assert "From ckpt_002/config.json" in section(html, "architecture")  # the latest readable one
    assert statuses(html)["training_config"] == "no"


def test_default_and_custom_output_written_atomically(tmp_path: Path):
    run = make_run(tmp_path / "run")
    out = build_report(run, tmp_path / "elsewhere" / "page.html")
    assert out == tmp_path / "elsewhere" / "page.html" and out.is_file()
    assert not (run / "report").exists()
    build_report(run)
    assert [p.name for p in (run / "report").iterdir()] == ["index.html"]  # no temporary file left


def test_not_a_directory_is_a_user_error(tmp_path: Path):
    with pytest.raises(Llm360Error, match="not a directory"):
        build_report(tmp_path / "missing")


def test_long_runs_are_decimated(tmp_path: Path):
    run = make_run(tmp_path / "run", chunks=60, steps_per_chunk=1000)
    t0 = time.perf_counter()
    html = build(run)
    seconds = time.perf_counter() - t0
    assert len(html) < 3_000_000, len(html)
    assert seconds < 30, seconds
    loss = re.search(r'<path class="series" d="([^"]*)" stroke="#4e79a7"', section(html, "training"))
    assert loss and loss.group(1).count("L") < 1000
    assert "60,000 steps drawn as 1,000 range means with their min-max band" in html
    assert html.count('<path class="band"') >= 4  # loss, grad norm, lr, throughput...


def test_chart_helpers():
    from llm360.report.charts import line_chart
    from llm360.report.svg import Series, decimate, esc, nice_ticks

    ys = [1.0] * 100_000
    ys[54_321] = 99.0  # a one-step spike survives thinning, in its bucket's band
    t = decimate([float(i) for i in range(100_000)], ys, 500)
    assert len(t.x) == 500 and t.hi is not None and max(t.hi) == 99.0 and max(t.y) < 2
    assert len(nice_ticks(0, 1, 5)) == 6 and len(nice_ticks(2.0, 2.0 + 1e-7, 5)) >= 3
    svg = line_chart("c", [Series('<x>"', [0, 1, 2], [1.0, float("nan"), 3.0])], xlabel="<b>", ylabel="y")
    assert "<x>" not in svg and esc('<x>"') in svg and "&lt;b&gt;" in svg
    assert svg.count('<path class="series" d="M') == 1 and "NaN" not in svg and "nan" not in svg.lower()
    assert line_chart("d", [Series("empty", [], [])]) == '<p class="na">no data points</p>'


# ------------------------------------------------------------------------------------ real runs


def _real_run(tmp_path: Path) -> Path:
    from llm360.data.prepare import prepare
    from llm360.train.loop import train
    from test_train import tiny_run_config

    cfg = tiny_run_config(tmp_path)
    run = tmp_path / "run"
    prepare(cfg, run)
    train(cfg, run)
    return run


@pytest.mark.slow
def test_real_run_report(tmp_path: Path):
    run = _real_run(tmp_path)
    html = build(run)
    got = statuses(html)
    for row in ("code", "training_config", "model_checkpoints", "optimizer_checkpoints", "data_mix",
                "data_ordering", "data_available", "training_logs"):  # fmt: skip
        assert got[row] == "yes", (row, got)
    assert got["evaluations"] == "no" and got["analyses"] == "no"
    av = available(html)
    assert all(av[s] == "yes" for s in ("config", "architecture", "data", "training")), av
    n_steps = sum(1 for line in (run / "metrics" / "train.jsonl").read_text().splitlines() if line.strip())
    assert f"metrics/train.jsonl: {n_steps:,} steps" in html
    for p in run.glob("checkpoints/*/optimizer.safetensors"):
        p.unlink()
    assert statuses(build(run))["optimizer_checkpoints"] == "no"


@pytest.mark.slow
def test_real_run_with_eval_and_analyses(tmp_path: Path):
    run = _real_run(tmp_path)
    try:
        from llm360.analysis import ContaminationConfig, MemorizationConfig
        from llm360.analysis.contamination import analyze_contamination
        from llm360.analysis.memorization import analyze_memorization
        from llm360.eval import EvalConfig, evaluate
    except ImportError as e:  # the stages are optional for the report; their absence is not its failure
        pytest.skip(f"eval/analysis stages not importable here: {e}")
    evaluate(run, tasks=["perplexity"], cfg=EvalConfig(device="cpu"))
    analyze_memorization(run, MemorizationConfig(prompt_tokens=8, continuation_tokens=8, rows_per_chunk=20,
                                                 device="cpu"))  # fmt: skip
    texts = [json.loads(line)["text"] for line in (tmp_path / "src" / "web.jsonl").read_text().splitlines()[:8]]
    task = tmp_path / "task.jsonl"
    task.write_text("".join(json.dumps({"text": t}) + "\n" for t in [*texts, "zebras drink quantum tea " * 4]))
    analyze_contamination(run, ContaminationConfig(ngram=8, workers=1), tasks=[str(task)])
    html = build(run)
    assert set(statuses(html).values()) == {"yes"}, statuses(html)
    assert set(available(html).values()) == {"yes"}, available(html)
    assert "perplexity" in section(html, "evaluations")
    mem = section(html, "memorization")
    assert 'class="chart heat"' in mem and "Score distribution" in mem
    assert "task" in section(html, "contamination")


# ------------------------------------------------------------------------------------ browser

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--mute-audio")  # fmt: skip


@pytest.fixture(scope="module")
def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    pytest.skip("chromium is not installed (Debian: apt-get install -y chromium); the browser tests need it")


def run_chromium(chromium: str, tmp: Path, *args: str, timeout: float = 90) -> str:
    """Run headless Chromium with its own profile; kill its whole process group on timeout."""
    profile = tmp / "chromium-profile"
    cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"chromium did not finish within {timeout}s")
    finally:
        try:  # renderer/zygote helpers must not outlive the test
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode == 0, f"chromium exited with {proc.returncode}: {err[-2000:]}"
    return out


def dom_attrs(dom: str) -> dict[str, str]:
    m = re.search(r"<html\b([^>]*)>", dom)
    assert m, dom[:500]
    return dict(re.findall(r'([a-z-]+)="([^"]*)"', m.group(1)))


def test_browser_draws_every_chart_without_script_errors(chromium: str, tmp_path: Path):
    page = build_report(make_run(tmp_path / "run"))
    html = page.read_text(encoding="utf-8")
    dom = run_chromium(chromium, tmp_path, "--dump-dom", page.as_uri())
    attrs = dom_attrs(dom)
    assert attrs.get("data-errors") == "0", re.search(r'<pre id="js-errors"[^>]*>(.*?)</pre>', dom, re.S)
    assert attrs.get("data-ok") == "1", attrs
    n_charts = html.count('<svg class="chart ')
    assert n_charts >= 15
    assert attrs["data-charts"] == str(n_charts) and attrs["data-drawn"] == str(n_charts), attrs
    assert attrs["data-lines"] == str(html.count('<path class="series"')), attrs
    assert 'class="hover"' in dom  # the script attached the hover readouts


def test_browser_reports_script_errors(chromium: str, tmp_path: Path):
    """The error detector itself works: a failing script turns data-ok off and is recorded."""
    page = build_report(make_run(tmp_path / "run", chunks=2))
    broken = page.with_name("broken.html")
    broken.write_text(page.read_text(encoding="utf-8").replace("</body>", "<script>noSuchFunction();</script></body>"))
    attrs = dom_attrs(run_chromium(chromium, tmp_path, "--dump-dom", broken.as_uri()))
    assert attrs.get("data-errors") == "1" and attrs.get("data-ok") == "0", attrs


def test_browser_page_without_data_loads(chromium: str, tmp_path: Path):
    (tmp_path / "empty").mkdir()
    page = build_report(tmp_path / "empty")
    attrs = dom_attrs(run_chromium(chromium, tmp_path, "--dump-dom", page.as_uri()))
    assert attrs.get("data-ok") == "1" and attrs.get("data-charts") == "0", attrs


def decode_png(data: bytes) -> tuple[int, int, list[bytes], int]:
    """(width, height, rows of pixel bytes, bytes per pixel) of an 8-bit RGB/RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, w, h, bpp = 8, [], 0, 0, 0
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            w, h, depth, ctype = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and ctype in (2, 6), (depth, ctype)
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    raw = zlib.decompress(b"".join(idat))
    stride = w * bpp
    rows, prev = [], bytearray(stride)
    for y in range(h):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        if f == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif f == 2:
            line = bytearray((a + b) & 255 for a, b in zip(line, prev, strict=True))
        elif f == 3:
            for i in range(stride):
                line[i] = (line[i] + ((line[i - bpp] if i >= bpp else 0) + prev[i]) // 2) & 255
        elif f == 4:
            for i in range(stride):
                a, b, c = (line[i - bpp] if i >= bpp else 0), prev[i], (prev[i - bpp] if i >= bpp else 0)
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return w, h, rows, bpp


def test_browser_screenshot_is_not_blank(chromium: str, tmp_path: Path):
    page = build_report(make_run(tmp_path / "run"))
    shot = tmp_path / "report.png"
    run_chromium(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri())
    assert shot.is_file() and shot.stat().st_size > 20_000
    w, h, rows, bpp = decode_png(shot.read_bytes())
    assert (w, h) == (1200, 2400)
    colours: set[bytes] = set()
    inked = 0
    for row in rows[::4]:
        for x in range(0, len(row), bpp * 4):
            px = row[x : x + 3]
            colours.add(px)
            inked += px != b"\xff\xff\xff"
    sampled = len(rows[::4]) * len(range(0, w * bpp, bpp * 4))
    assert len(colours) > 50, len(colours)  # text, chart colours and anti-aliasing, not a flat page
    assert inked / sampled > 0.03, inked / sampled
    top = {rows[y][x : x + 3] for y in range(0, 400, 2) for x in range(0, w * bpp, bpp * 2)}
    assert len(top) > 5  # the header and table are drawn, not only something far below


def test_browser_hover_readout(chromium: str, tmp_path: Path):
    """Moving the mouse over the loss chart shows the step, its chunk and tokens, and the loss there."""
    page = build_report(make_run(tmp_path / "run"))
    probe = """<script>
    document.addEventListener("DOMContentLoaded", function () {
      var svg = document.querySelector("#training svg.chart.line");
      var r = svg.getBoundingClientRect();
      svg.dispatchEvent(new MouseEvent("mousemove", {clientX: r.left + r.width * 0.5, clientY: r.top + r.height / 2,
                                                      bubbles: true}));
      var tip = document.getElementById("tip");
      document.documentElement.setAttribute("data-tip", tip.hidden ? "hidden" : tip.textContent);
    });
    </script>"""
    probed = page.with_name("probe.html")
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", probe + "</body>"))
    attrs = dom_attrs(run_chromium(chromium, tmp_path, "--window-size=1200,2000", "--dump-dom", probed.as_uri()))
    assert attrs.get("data-errors") == "0" and attrs.get("data-ok") == "1", attrs
    tip = attrs.get("data-tip", "")
    assert re.fullmatch(r"step \d+chunk \d+ · [\d.]+k tokensloss: [\d.]+", tip), tip


_ODD = (None, "x", "", [], {}, -1, 0, 1e308, -1e308, True, [1, "a", None], {"k": None}, "nan", 2**70, 10**400)


def _mutate(obj, rng: np.random.Generator, p: float):
    if rng.random() < p:
        return _ODD[rng.integers(len(_ODD))]
    if isinstance(obj, dict):
        return {k: _mutate(v, rng, p) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_mutate(v, rng, p) for v in obj]
    return obj


@pytest.mark.parametrize("seed", range(int(os.environ.get("REPORT_FUZZ_SEEDS", "12"))))
def test_files_with_unexpected_shapes_never_crash(tmp_path: Path, seed: int):
    """Every JSON file parses but holds odd values in odd places: the page is still written."""
    run = make_run(tmp_path / "run", chunks=3, steps_per_chunk=8)
    rng = np.random.default_rng(seed)
    p = 0.05 + 0.1 * (seed % 4)
    for f in sorted(run.rglob("*.json")):
        f.write_text(json.dumps(_mutate(json.loads(f.read_text()), rng, p)))
    for f in sorted(run.rglob("*.jsonl")):
        lines = []
        for x in f.read_text().splitlines():
            try:
                lines.append(json.dumps(_mutate(json.loads(x), rng, p)))
            except ValueError:
                lines.append(x)
        f.write_text("\n".join(lines) + "\n")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump(_mutate(cfg, rng, p)))
    html = build(run)
    assert len(statuses(html)) == 10
    assert len(available(html)) == 8
    failed = re.findall(r'<section id="([a-z]+)"[^>]*data-failed="yes"', html)
    assert not failed, (failed, re.findall(r"section left out: [^<]*", html))
