"""verify's hashing rate against `sha256sum -c` of the same files, in the same run.

A folder shaped like a release (a few large weight/optimizer files, a few dozen chunk-sized files,
many small JSON files; --gb in all) gets a SHA256SUMS; then, in alternating order per repeat:

- baseline: ``sha256sum --quiet -c SHA256SUMS`` (GNU coreutils, what a user would run);
- ours:     the integrity check of ``llm360 verify`` (:func:`llm360.release.verify._check_sums`:
            the listing, every entry's safety, every file's sha256) with 1, 2, ... threads.

Files are read once before timing, so both sides hash from the page cache: the figure is the
hashing rate, not the disk's. Reported: GB/s per side (median of the repeats) and ours/baseline.
Goal: >= 0.9x with one thread, >= 1.6x with two.

    .venv/bin/python bench/verify.py                       # 1.5 GB, threads 1,2, 3 repeats
    .venv/bin/python bench/verify.py --gb 4 --threads 1,2,4 --dir /mnt/fast
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from llm360.release.sums import SUMS, format_sums, hash_files
from llm360.release.verify import VerifyReport, _check_sums


def make_release(root: Path, gb: float) -> int:
    """Files totalling ~gb GB: 60% in 3 large files, 35% in 32 medium ones, the rest in 400 small ones."""
    total = int(gb * 1e9)
    sizes = [int(total * 0.6 / 3)] * 3 + [int(total * 0.35 / 32)] * 32 + [int(total * 0.05 / 400)] * 400
    rng_block = os.urandom(1 << 20)
    for i, size in enumerate(sizes):
        if i < 3:
            rel = f"checkpoints/ckpt_{i:03d}/model.safetensors"
        else:
            rel = f"data/chunk_{i:03d}.npy" if i < 35 else f"eval/ckpt_{i % 7:03d}/task_{i:03d}.json"
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f:
            left = size
            salt = i.to_bytes(4, "little")
            while left > 0:
                n = min(left, len(rng_block))
                f.write(salt + rng_block[4:n])
                left -= n
    files = [(p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file()]
    sums = hash_files(files, 2)
    (root / SUMS).write_text(format_sums({k: str(v) for k, v in sums.items()}))
    return sum(sizes)


def time_baseline(root: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["sha256sum", "--quiet", "-c", SUMS], cwd=root, check=True)
    return time.perf_counter() - t0


def time_ours(root: Path, threads: int) -> float:
    rep = VerifyReport(root)
    t0 = time.perf_counter()
    _check_sums(root, rep, threads)
    seconds = time.perf_counter() - t0
    if rep.problems:
        raise SystemExit(f"verify found problems in the benchmark folder: {rep.problems[:3]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=1.5, help="size of the folder (GB)")
    ap.add_argument("--threads", default="1,2", help="thread counts of ours, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", help="where to build the folder (default: a temporary one)")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    root = Path(tempfile.mkdtemp(prefix="llm360-bench-verify-", dir=args.dir))
    try:
        size = make_release(root, args.gb)
        print(f"folder: {size / 1e9:.2f} GB in {sum(1 for _ in root.rglob('*') if _.is_file()) - 1} files; "
              f"cores {os.cpu_count()}, load {os.getloadavg()[0]:.1f}")
        time_baseline(root)  # warm the page cache (and the binary)
        base: list[float] = []
        ours: dict[int, list[float]] = {t: [] for t in threads}
        for r in range(args.repeats):
            order = [("base", 0)] + [("ours", t) for t in threads]
            for kind, t in order if r % 2 == 0 else order[::-1]:
                if kind == "base":
                    base.append(time_baseline(root))
                else:
                    ours[t].append(time_ours(root, t))
        b = statistics.median(base)
        print(f"sha256sum -c          {size / b / 1e9:6.2f} GB/s  ({b:.2f} s)")
        for t in threads:
            o = statistics.median(ours[t])
            print(f"verify, {t} thread{'s' if t > 1 else ' '}     {size / o / 1e9:6.2f} GB/s  ({o:.2f} s)  "
                  f"ratio {b / o:.2f}x")
        print(f"load at the end {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
