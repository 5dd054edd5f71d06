"""llm360's lm-eval model against lm-eval's own `hf` model, on the same checkpoint and tasks.

Measured in one run, same weights, same tokenizer, same batch size:
  hf       lm_eval.models.huggingface.HFLM (transformers' LlamaForCausalLM)
  llm360   llm360.eval.adapter.LLM360LM (our Llama, in-process)
on the three `demo` tasks (loglikelihood: two multiple-choice tasks; generate_until: one) and on
loglikelihood_rolling over held-out-like texts. Prints seconds per task, the ratio hf / llm360
(> 1: llm360 is faster) and whether the scores agree.

    python bench/eval.py --model tiny --seq-len 128 --batch-size 16 --device cpu
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def build_checkpoint(folder: Path, model_name: str, seq_len: int, vocab: int) -> Path:
    """A random-init Llama in a Hugging Face folder with a BPE trained on the embedded corpus."""
    from llm360.config import MODEL_PRESETS, ModelConfig, TokenizerConfig
    from llm360.data.embedded import iter_embedded
    from llm360.data.tokenizer import train_bpe
    from llm360.model.hf import save_hf_folder
    from llm360.model.llama import Llama

    texts = [t for part in ("licenses", "docs") for _, t in iter_embedded(part)]
    tok, origin = train_bpe(iter(texts), TokenizerConfig(vocab_size=vocab))
    tok.save(folder, origin)
    cfg = ModelConfig(**{**MODEL_PRESETS[model_name], "vocab_size": tok.vocab_size, "max_seq_len": seq_len})
    torch.manual_seed(0)
    save_hf_folder(Llama(cfg), cfg, folder, eos_token_id=tok.eos_id)
    return folder


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="llm360 model preset (tiny, 125m, 1b)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from lm_eval import simple_evaluate
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from llm360.data.embedded import iter_embedded
    from llm360.eval import TASKS_DIR
    from llm360.eval.adapter import LLM360LM
    from llm360.eval.harness import hub_access, quiet_lm_eval

    tasks = ["llm360_demo_licence_mc", "llm360_demo_next_line_mc", "llm360_demo_complete_line"]
    with tempfile.TemporaryDirectory() as tmp, hub_access(False), quiet_lm_eval():
        folder = build_checkpoint(Path(tmp) / "ckpt", args.model, args.seq_len, args.vocab)
        tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
        models = {
            "hf": HFLM(pretrained=str(folder), device=args.device, dtype="float32", batch_size=args.batch_size),
            "llm360": LLM360LM(str(folder), device=args.device, batch_size=args.batch_size),
        }
        rows = []
        for task in tasks:
            res, secs = {}, {}
            for name, lm in models.items():
                out, secs[name] = timed(lambda lm=lm, task=task: simple_evaluate(
                    model=lm, tasks=[task], task_manager=tm, num_fewshot=0, bootstrap_iters=0, log_samples=False,
                ))  # fmt: skip
                res[name] = {k: v for k, v in out["results"][task].items() if k.endswith(",none") and "stderr" not in k}
            rows.append((task, secs, res["hf"] == res["llm360"], res["llm360"]))
        texts = [t for _, t in iter_embedded("docs")][:40]
        reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
        ll, secs = {}, {}
        for name, lm in models.items():
            ll[name], secs[name] = timed(lambda lm=lm: lm.loglikelihood_rolling(reqs))
        agree = max(abs(a - b) for a, b in zip(ll["hf"], ll["llm360"], strict=True))
        rows.append(("loglikelihood_rolling (40 pydoc topics)", secs, agree <= 1e-3, {"max |diff|": agree}))

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"
    print(f"model {args.model}, seq_len {args.seq_len}, batch {args.batch_size}, device {device}")
    print(f"{'task':42s} {'hf s':>8s} {'llm360 s':>9s} {'hf/llm360':>10s}  same scores")
    for task, secs, same, scores in rows:
        print(f"{task:42s} {secs['hf']:8.2f} {secs['llm360']:9.2f} {secs['hf'] / secs['llm360']:10.2f}  {same}  "
              f"{json.dumps(scores)}")


if __name__ == "__main__":
    main()
