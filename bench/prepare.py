"""End-to-end `llm360 prepare` throughput against the baselines a user would otherwise use.

Measured in one run, on the same JSONL text and the same tokenizer, at 1x, 4x and 16x the corpus:
  floor     `tokenizers` encode_batch alone on texts already in memory
  datasets  `datasets.load_dataset("json")` + `.map(batched=True, num_proc=N)` tokenization + one
            numpy array written to disk (what a user would otherwise write)
  llm360    `llm360 prepare` end to end (map: read, split, tokenize; plan; scatter; reduce: chunks,
            provenance, documents tables, sha256 manifest): in-process with 1 and with N
            single-threaded workers (each a fresh process), and on a 3-node Ray cluster on
            127.0.0.1 inside a network namespace this script creates (`unshare -n`; root)
For each: seconds, tokens/s, tokens per CPU-second (every process it used, workers included),
peak RSS of the largest task (the process that ran it), and the scratch folder's peak size
beside the output. Then per-core rates and the scaling from 1 to N workers, for the cluster
extrapolation in bench/RESULTS.md.

    python bench/prepare.py --mb 4 --workers 2 --scales 1,4,16

With ``--fim``: instead, the cost of the fill-in-the-middle transform. The same corpus is prepared
(1 worker, fresh processes, alternating, best of ``--repeats``) with the mix entry at fim_rate 0 and
at 0.9 (SPM 0.5, as CrystalCoder's stage 2), both with a tokenizer that has the FIM sentinels; the
ratio is CPU-seconds per token of the stream (``tokens_packed``) with FIM over without (goal: at
most 1.05, i.e. the transform under 5% of prepare's time). With ``--fim-weight 2`` each copy is
drawn on its own, so a document's two copies are tokenized apart: the cost of per-repeat draws.

    python bench/prepare.py --fim --mb 4 --repeats 3
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
import threading
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


FIM_TOKENS = ["<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>"]


def train_tokenizer(corpus: Path, out: Path, extra_special: list[str] | None = None) -> Path:
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
        vocab_size=8192, special_tokens=["<|endoftext|>", *(extra_special or [])], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = out / "tokenizer.json"
    tok.save(str(path))
    return path


def _cpu() -> float:
    r, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def bench_floor(corpus: Path, tok_path: Path) -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    t0, c0 = time.perf_counter(), _cpu()
    n = 0
    for i in range(0, len(texts), 512):
        n += sum(len(e.ids) for e in tok.encode_batch(texts[i : i + 512], add_special_tokens=False))
    return {"s": time.perf_counter() - t0, "cpu": _cpu() - c0, "tokens": n}


def bench_datasets(corpus: Path, tok_path: Path, workers: int, tmp: Path) -> dict:
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets
    from transformers import PreTrainedTokenizerFast

    datasets.disable_progress_bars()
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_path), eos_token="<|endoftext|>")
    shutil.rmtree(tmp / "hf", ignore_errors=True)
    t0, c0 = time.perf_counter(), _cpu()
    ds = datasets.load_dataset("json", data_files=str(corpus), split="train", cache_dir=str(tmp / "hf"))

    def tokenize(batch):
        return {"ids": [x + [tok.eos_token_id] for x in tok(batch["text"], add_special_tokens=False)["input_ids"]]}

    ds = ds.map(tokenize, batched=True, num_proc=workers if workers > 1 else None,
                remove_columns=["text"])
    ids = np.concatenate([np.asarray(x, dtype=np.uint16) for x in ds["ids"]])
    np.save(tmp / "datasets_tokens.npy", ids)
    out = {"s": time.perf_counter() - t0, "cpu": _cpu() - c0, "tokens": int(ids.size)}
    del ds
    shutil.rmtree(tmp / "hf", ignore_errors=True)
    (tmp / "datasets_tokens.npy").unlink()
    return out


def prepare_config(corpus: Path, tok_path: Path, out: Path, fim: tuple[float, float, float] | None = None) -> Path:
    """The bench's config; ``fim`` = (weight, fim_rate, spm_rate) gives it one stage with that mix entry."""
    cfg: dict = {"data": {
        "seq_len": 2048, "chunks": 4, "valid_fraction": 0.001,
        "sources": [{"name": "bench", "kind": "jsonl", "paths": [str(corpus)]}],
        "tokenizer": {"kind": "file", "path": str(tok_path)},
    }}
    if fim is not None:
        weight, rate, spm = fim
        cfg["data"]["stages"] = [{"name": "main", "chunks": 4, "mix": [
            {"source": "bench", "weight": weight, "fim_rate": rate, "spm_rate": spm}]}]
    path = out / ("bench.json" if fim is None else f"bench-fim-{fim[1]}.json")
    path.write_text(json.dumps(cfg))
    return path


def _folder_bytes(folder: Path) -> int:
    total = 0
    for top, _, names in os.walk(folder):
        for n in names:
            try:
                total += os.stat(os.path.join(top, n)).st_size
            except OSError:
                pass
    return total


def _hwm_mb(pid: int) -> float:
    """Peak RSS of one process (VmHWM: its own, unlike ru_maxrss, which a child inherits from its parent)."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _descendants(root: int) -> list[int]:
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
                parent[int(d)] = int(stat[stat.rindex(")") + 2 :].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


class _ScratchWatch:
    """Samples, while a prepare runs, the size of its scratch folder (``.prepare/`` less the data set
    being built) and the peak RSS of the process(es) running its tasks (``pid``'s workers, or ``pid``)."""

    def __init__(self, run_dir: Path, pid: int | None = None) -> None:
        self.run_dir, self.pid, self.peak, self.rss = run_dir, pid, 0, 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            scratch = self.run_dir / ".prepare"
            if scratch.is_dir():
                build = sum(_folder_bytes(d) for d in scratch.glob("*/data-*"))
                self.peak = max(self.peak, _folder_bytes(scratch) - build)
            if self.pid is not None:
                procs = _descendants(self.pid) or [self.pid]
                self.rss = max([self.rss] + [_hwm_mb(p) for p in procs])

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        return self.peak


_PREPARE = """
import json, sys, time
from llm360.config import validate_config
from llm360.data.prepare import prepare
cfg = validate_config(json.loads(open(sys.argv[1]).read()))
t = time.perf_counter()
r = prepare(cfg, sys.argv[2], workers=int(sys.argv[3]), piece_bytes=int(sys.argv[4]))
m = r.manifest
print(json.dumps({"s": time.perf_counter() - t,
                  "tokens": sum(s["tokens_train_documents"] + s["tokens_valid_documents"] for s in m["sources"].values()),
                  "tokens_packed": sum(st["tokens_packed"] for st in m["stages"]),
                  "fim_share": [st.get("fim_share", 0.0) for st in m["stages"]],
                  "chunk_bytes": sum(f["bytes"] for k, f in m["files"].items() if k.startswith("chunk_"))}))
"""


def run_prepare(cfg: Path, run_dir: Path, workers: int, piece_bytes: int) -> dict:
    """A fresh `prepare` process with single-threaded workers: seconds, CPU seconds (its workers too),
    peak RSS of the process that ran the tasks, tokens, scratch peak."""
    env = dict(os.environ, RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    p = subprocess.Popen([sys.executable, "-c", _PREPARE, str(cfg), str(run_dir), str(workers), str(piece_bytes)],
                         stdout=subprocess.PIPE, text=True, env=env)
    watch = _ScratchWatch(run_dir, p.pid)
    out = p.stdout.read() if p.stdout else ""
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    scratch = watch.stop()
    if p.returncode:
        raise SystemExit(f"prepare failed (exit {p.returncode})")
    res = json.loads(out.strip().splitlines()[-1])
    res["cpu"] = usage.ru_utime + usage.ru_stime
    res["rss_task"] = watch.rss
    res["scratch"] = scratch
    shutil.rmtree(run_dir, ignore_errors=True)
    return res


# A 3-node Ray cluster on loopback inside the network namespace, the prepare driven from here;
# CPU and peak RSS are read from /proc for every process of the namespace.
_RAY = r"""
import json, os, sys, time, threading
from pathlib import Path
sys.path.insert(0, sys.argv[5])
from prepare import _ScratchWatch
cfg_path, run_dir, piece_bytes, nodes = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
TICK = os.sysconf("SC_CLK_TCK")

def procs():
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
                fields = stat[stat.rindex(")") + 2:].split()
                hwm = [l for l in open(f"/proc/{d}/status") if l.startswith("VmHWM")]
                cmd = open(f"/proc/{d}/cmdline", "rb").read()
                out[int(d)] = ((int(fields[11]) + int(fields[12])) / TICK,  # Ray titles its workers ray::...
                               int(hwm[0].split()[1]) / 1024 if hwm else 0.0, cmd.startswith(b"ray::"))
            except (OSError, ValueError, IndexError):
                pass
    return out

from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
try:
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    from llm360.config import validate_config
    from llm360.data.prepare import prepare
    from llm360.executor import RayExecutor
    cfg = validate_config(json.loads(open(cfg_path).read()))
    with RayExecutor(cluster.address) as ex:
        before = procs()
        t0 = time.perf_counter()
        watch = _ScratchWatch(run_dir)
        r = prepare(cfg, run_dir, executor=ex, piece_bytes=piece_bytes)
        s = time.perf_counter() - t0
        scratch = watch.stop()
        after = procs()
    cpu = sum(c - before.get(pid, (0.0,))[0] for pid, (c, _, _) in after.items())
    rss = max((h for _, h, w in after.values() if w), default=0.0)
    m = r.manifest
    print("RESULT " + json.dumps({"s": s, "cpu": cpu, "rss_task": rss, "scratch": scratch,
        "tokens": sum(x["tokens_train_documents"] + x["tokens_valid_documents"] for x in m["sources"].values()),
        "chunk_bytes": sum(f["bytes"] for k, f in m["files"].items() if k.startswith("chunk_"))}))
finally:
    import ray
    ray.shutdown()
    cluster.shutdown()
"""


def run_ray(cfg: Path, run_dir: Path, piece_bytes: int, nodes: int = 3) -> dict | None:
    """The same prepare on a Ray cluster of ``nodes`` 1-CPU nodes in a loopback-only network namespace."""
    if not shutil.which("unshare"):
        return None
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    script = run_dir.parent / "ray_bench.py"
    script.write_text(_RAY)
    inner = (f"ip link set lo up && exec {sys.executable} {script} {cfg} {run_dir} {piece_bytes} {nodes} "
             f"{Path(__file__).resolve().parent}")
    env = dict(os.environ, RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    p = subprocess.Popen(["unshare", "-n", "sh", "-c", inner], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True, env=env, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=1800)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, 9)
            p.wait()
    shutil.rmtree(run_dir, ignore_errors=True)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][7:]) if lines else None


def bench_plan_and_tables(rows: int = 10_000_000, lines: int = 200_000) -> dict:
    """Rates of the two serial steps: the plan's permutation (rows/s) and a documents table (lines/s)."""
    from llm360.data.prepare_tables import _GzipLines

    t0 = time.perf_counter()
    perm = np.random.default_rng([1234, 0]).permutation(rows)
    position = np.empty(rows, dtype=np.int64)
    position[perm] = np.arange(rows)
    plan_rate = rows / (time.perf_counter() - t0)
    del perm, position
    rec = '{"id":"refinedweb/part-00123.jsonl:%d","n":%d,"sha256_16":"0123456789abcdef","status":"train","tokens":%d}\n'
    blob = "".join(rec % (i, i, 300 + i % 997) for i in range(lines)).encode()
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        w = _GzipLines(Path(d) / "t.jsonl.gz")
        w.write_lines(blob)
        w.close()
        table_rate = lines / (time.perf_counter() - t0)
    return {"plan_rows_per_s": plan_rate, "table_lines_per_s": table_rate, "table_bytes_per_line": len(blob) / lines}


def bench_fim(args: argparse.Namespace, tmp: Path) -> None:
    """Prepare with and without FIM (see the module docstring) and print the cost ratio."""
    piece = int(args.piece_mb * 1e6)
    corpus = tmp / "corpus.jsonl"
    n_docs = build_corpus(corpus, args.mb)
    tok_path = train_tokenizer(corpus, tmp, FIM_TOKENS)
    print(f"corpus: {n_docs} documents, {corpus.stat().st_size / 1e6:.1f} MB; cores: {os.cpu_count()}; "
          f"1 worker; mix weight {args.fim_weight}; best of {args.repeats}")
    cfgs = {rate: prepare_config(corpus, tok_path, tmp, (args.fim_weight, rate, 0.5 if rate else 0.0))
            for rate in (0.0, 0.9)}
    best: dict[float, dict] = {}
    for _ in range(args.repeats):
        for rate, cfg in cfgs.items():  # alternating, so a busy moment of the machine hits both
            r = run_prepare(cfg, tmp / "run", 1, piece)
            if rate not in best or r["cpu"] / r["tokens_packed"] < best[rate]["cpu"] / best[rate]["tokens_packed"]:
                best[rate] = r
    print(f"{'fim_rate':>8} {'seconds':>9} {'CPU-s':>8} {'stream tokens':>14} {'FIM share':>10} {'us/token (CPU)':>15}")
    for rate, r in best.items():
        print(f"{rate:>8} {r['s']:>9.2f} {r['cpu']:>8.2f} {r['tokens_packed']:>14} {r['fim_share'][0]:>10.1%} "
              f"{1e6 * r['cpu'] / r['tokens_packed']:>15.3f}")
    plain, fim = best[0.0], best[0.9]
    ratio = (fim["cpu"] / fim["tokens_packed"]) / (plain["cpu"] / plain["tokens_packed"])
    print(f"RATIO FIM: CPU-seconds per token with FIM 0.9 / without = {ratio:.3f} (goal <= 1.05); "
          f"wall {fim['s'] / plain['s']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=4.0, help="size of the 1x corpus in MB of JSONL")
    ap.add_argument("--workers", type=int, default=2, help="processes for datasets.map and llm360 --workers")
    ap.add_argument("--scales", default="1,4,16", help="corpus multiples")
    ap.add_argument("--piece-mb", type=float, default=1.0, help="piece size (the result never depends on it)")
    ap.add_argument("--no-ray", action="store_true", help="leave out the Ray cluster")
    ap.add_argument("--fim", action="store_true", help="measure the FIM transform's cost instead (see above)")
    ap.add_argument("--fim-weight", type=float, default=1.0, help="with --fim: the mix entry's weight (repeats)")
    ap.add_argument("--repeats", type=int, default=3, help="with --fim: runs of each, the best kept")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="llm360-bench-prepare-"))
    if args.fim:
        try:
            bench_fim(args, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    piece = int(args.piece_mb * 1e6)
    try:
        base_corpus = tmp / "corpus.jsonl"
        n_docs = build_corpus(base_corpus, args.mb)
        tok_path = train_tokenizer(base_corpus, tmp)
        print(f"corpus 1x: {n_docs} documents, {base_corpus.stat().st_size / 1e6:.1f} MB; cores: {os.cpu_count()}; "
              f"pieces of {args.piece_mb} MB")
        base = base_corpus.read_bytes()
        hdr = (f"{'scale':>5} {'what':<34}{'seconds':>9}{'tokens':>11}{'tokens/s':>11}{'tok/CPU-s':>11}"
               f"{'task RSS MB':>12}{'scratch/out':>12}")
        for k in [int(x) for x in args.scales.split(",")]:
            corpus = tmp / f"corpus_{k}x.jsonl"
            with open(corpus, "wb") as f:
                for _ in range(k):
                    f.write(base)
            cfg_dir = tmp / f"cfg{k}"
            cfg_dir.mkdir()
            cfg = prepare_config(corpus, tok_path, cfg_dir)
            # llm360 first (fresh processes), then the in-process baselines, whose pools and caches
            # must not be running or warm while llm360 is measured
            res = {}
            for w in sorted({1, args.workers}):
                res[f"llm360 prepare, {w} worker(s)"] = run_prepare(cfg, tmp / "run", w, piece)
            if not args.no_ray:
                r = run_ray(cfg, tmp / "ray_run", piece)
                if r is not None:
                    res["llm360 prepare, Ray 3 nodes x 1 CPU"] = r
            res["floor: tokenizers encode_batch"] = bench_floor(corpus, tok_path)
            res[f"datasets.map num_proc={args.workers}"] = bench_datasets(corpus, tok_path, args.workers, tmp)
            print(hdr)
            for what, r in res.items():
                scr = f"{r['scratch'] / r['chunk_bytes']:.2f}" if "scratch" in r else ""
                rss = f"{r['rss_task']:.0f}" if "rss_task" in r else ""
                print(f"{f'{k}x':>5} {what:<34}{r['s']:>9.2f}{r['tokens']:>11}{r['tokens'] / r['s']:>11.0f}"
                      f"{r['tokens'] / r['cpu']:>11.0f}{rss:>12}{scr:>12}")
            floor = res["floor: tokenizers encode_batch"]
            one, many = res["llm360 prepare, 1 worker(s)"], res[f"llm360 prepare, {args.workers} worker(s)"]
            fc = floor["tokens"] / floor["cpu"]
            print(f"RATIO {k}x: llm360 tokens per CPU-second / floor's = {one['tokens'] / one['cpu'] / fc:.2f} "
                  f"(1 worker), {many['tokens'] / many['cpu'] / fc:.2f} ({args.workers} workers) (goal >= 0.8); "
                  f"{args.workers} workers / 1 = {one['s'] / many['s']:.2f}x (goal >= 1.7 with 2 workers)\n")
            corpus.unlink()
        serial = bench_plan_and_tables()
        print(f"serial steps: plan permutation {serial['plan_rows_per_s']:.3g} rows/s; documents table "
              f"{serial['table_lines_per_s']:.3g} lines/s ({serial['table_bytes_per_line']:.0f} B a line)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
