"""End-to-end `llm360 prepare` throughput against the baselines a user would otherwise use.

Measured in one run, on the same JSONL text and the same tokenizer:
  floor     `tokenizers` encode_batch alone on texts already in memory
  datasets  `datasets.load_dataset("json")` + `.map(batched=True, num_proc=N)` tokenization + one
            numpy array written to disk (what a user would otherwise write)
  llm360    `llm360 prepare` end to end (read, split, tokenize, pack, permute, chunk, provenance,
            manifest with sha256 of every file)
Then time and peak RSS of `llm360 prepare` at 1x, 4x and 16x the corpus (each in a fresh process).

    python bench/prepare.py --mb 16 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def build_corpus(path: Path, target_mb: float) -> int:
    """A JSONL corpus of real text (the embedded default's sources), repeated to target_mb."""
    from llm360.data.embedded import iter_embedded

    # Web-like documents: the embedded texts cut at paragraph breaks into pieces of ~0.5-3 KB
    # (typical of web corpora), so per-document overheads count as they do in real data.
    docs: list[str] = []
    total = 0
    for part in ("package-docs", "licenses", "docs", "code"):
        for _, text in iter_embedded(part):
            piece = ""
            for para in text.split("\n\n"):
                piece = f"{piece}\n\n{para}" if piece else para
                if len(piece) >= 2000:
                    docs.append(piece)
                    total += len(piece)
                    piece = ""
            if len(piece) >= 500:
                docs.append(piece)
                total += len(piece)
            if total > 8e6:
                break
    n, size = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target_mb * 1e6:
            for d in docs:
                line = json.dumps({"text": d}) + "\n"
                f.write(line)
                size += len(line)
                n += 1
                if size >= target_mb * 1e6:
                    break
    return n


def train_tokenizer(corpus: Path, out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def texts():
        with open(corpus, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i > 3000:
                    break
                yield json.loads(line)["text"]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts(), trainers.BpeTrainer(
        vocab_size=8192, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = out / "tokenizer.json"
    tok.save(str(path))
    return path


def bench_floor(corpus: Path, tok_path: Path) -> tuple[float, int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(texts), 512):
        n += sum(len(e.ids) for e in tok.encode_batch(texts[i : i + 512], add_special_tokens=False))
    return time.perf_counter() - t0, n


def bench_datasets(corpus: Path, tok_path: Path, workers: int, tmp: Path) -> tuple[float, int]:
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets
    from transformers import PreTrainedTokenizerFast

    datasets.disable_progress_bars()
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_path), eos_token="<|endoftext|>")
    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(corpus), split="train", cache_dir=str(tmp / "hf"))

    def tokenize(batch):
        return {"ids": [x + [tok.eos_token_id] for x in tok(batch["text"], add_special_tokens=False)["input_ids"]]}

    ds = ds.map(tokenize, batched=True, num_proc=workers if workers > 1 else None,
                remove_columns=["text"])
    ids = np.concatenate([np.asarray(x, dtype=np.uint16) for x in ds["ids"]])
    np.save(tmp / "datasets_tokens.npy", ids)
    return time.perf_counter() - t0, int(ids.size)


def prepare_config(corpus: Path, tok_path: Path, out: Path) -> Path:
    import yaml

    cfg = {"data": {
        "seq_len": 2048, "chunks": 4, "valid_fraction": 0.001,
        "sources": [{"name": "bench", "kind": "jsonl", "paths": [str(corpus)]}],
        "tokenizer": {"kind": "file", "path": str(tok_path)},
    }}
    path = out / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_prepare(cfg: Path, run_dir: Path, workers: int) -> tuple[float, float, int]:
    """Seconds, peak RSS (MB) of a fresh `llm360 prepare` process, tokens packed."""
    code = (
        "import sys, time, resource, json; from llm360.config import load_config; "
        "from llm360.data.prepare import prepare; t=time.perf_counter(); "
        f"r=prepare(load_config({str(cfg)!r}), {str(run_dir)!r}, workers={workers}); "
        "print(json.dumps({'s': time.perf_counter()-t, 'rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024, "
        "'children_rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024, "
        "'tokens': sum(s['tokens_train_documents']+s['tokens_valid_documents'] for s in r.manifest['sources'].values())}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return res["s"], max(res["rss"], res["children_rss"]), res["tokens"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=16.0, help="size of the 1x corpus in MB of JSONL")
    ap.add_argument("--workers", type=int, default=2, help="processes for datasets.map and llm360 --workers")
    ap.add_argument("--scales", default="1,4,16", help="corpus multiples for the time/RSS scaling runs")
    ap.add_argument("--skip-scaling", action="store_true")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="llm360-bench-prepare-"))
    try:
        corpus = tmp / "corpus.jsonl"
        n_docs = build_corpus(corpus, args.mb)
        tok_path = train_tokenizer(corpus, tmp)
        cfg = prepare_config(corpus, tok_path, tmp)
        print(f"corpus: {n_docs} documents, {corpus.stat().st_size / 1e6:.1f} MB; cores: {os.cpu_count()}")

        # llm360 first (fresh processes), then the in-process baselines: datasets' worker pools and
        # caches must not be running or warm while llm360 is measured
        results = {}
        for w in sorted({1, args.workers}):
            shutil.rmtree(tmp / f"run{w}", ignore_errors=True)
            t, rss, n = run_prepare(cfg, tmp / f"run{w}", w)
            results[w] = (t, rss, n)
        t_floor, n_floor = bench_floor(corpus, tok_path)
        t_ds, n_ds = bench_datasets(corpus, tok_path, args.workers, tmp)
        floor_tps = n_floor / t_floor
        ds_tps = n_ds / t_ds
        print(f"{'what':<44}{'seconds':>9}{'tokens':>12}{'tokens/s':>12}")
        print(f"{'floor: tokenizers encode_batch (in memory)':<44}{t_floor:>9.2f}{n_floor:>12}{floor_tps:>12.0f}")
        print(f"{f'datasets.map num_proc={args.workers} + np.save':<44}{t_ds:>9.2f}{n_ds:>12}{ds_tps:>12.0f}")
        for w, (t, rss, n) in results.items():
            print(f"{f'llm360 prepare --workers {w}':<44}{t:>9.2f}{n:>12}{n / t:>12.0f}"
                  f"   {n / t / floor_tps:.2f}x floor, {n / t / ds_tps:.2f}x datasets, peak RSS {rss:.0f} MB")
        best = max(results, key=lambda w: results[w][2] / results[w][0])
        bt = results[best][2] / results[best][0]
        print(f"RATIO llm360/floor = {bt / floor_tps:.2f} (goal >= 0.8)   "
              f"llm360/datasets = {bt / ds_tps:.2f} (goal >= 2.0)   [best: --workers {best}]")

        if not args.skip_scaling:
            print(f"\nscaling (llm360 prepare --workers {best}, fresh process each):")
            print(f"{'corpus':>8}{'MB':>8}{'seconds':>10}{'s per MB':>10}{'peak RSS MB':>13}")
            base = corpus.read_bytes()
            for k in [int(s) for s in args.scales.split(",")]:
                big = tmp / f"corpus_{k}x.jsonl"
                with open(big, "wb") as f:
                    for _ in range(k):
                        f.write(base)
                cfg_dir = tmp / f"cfg{k}"
                cfg_dir.mkdir()
                cfg_k = prepare_config(big, tok_path, cfg_dir)
                t, rss, _ = run_prepare(cfg_k, tmp / f"scale{k}", best)
                mb = big.stat().st_size / 1e6
                print(f"{f'{k}x':>8}{mb:>8.0f}{t:>10.1f}{t / mb:>10.3f}{rss:>13.0f}")
                big.unlink()
                shutil.rmtree(tmp / f"scale{k}", ignore_errors=True)
        print(f"(self peak RSS of this driver: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
