"""Sampled generation in the lm-eval adapter (seeded per request) and the sampled pass@1 code tasks."""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import make_docs
from llm360.config import ModelConfig
from llm360.eval import TASKS_DIR, resolve_tasks
from llm360.eval.harness import hub_access
from llm360.model.llama import Llama
from test_eval import _train_a_little

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from llm360.eval.adapter import LLM360LM, request_seed, sample_tokens, sampling_of  # noqa: E402

HUMANEVAL = TASKS_DIR / "llm360_humaneval_sampled_n20.yaml"
MBPP = TASKS_DIR / "llm360_mbpp_sampled_n20.yaml"
PROMPTS = ["the model data", "doc 3: the", "def f(x):\n    return", "x"]
HOT = {"until": ["zzzz"], "max_gen_toks": 12, "do_sample": True, "temperature": 1.0, "top_p": 0.95}


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny() -> tuple[Llama, Any]:
    """A byte-level BPE tokenizer and a tiny Llama trained a little on the same toy corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    docs = make_docs(200, seed=5) + ["def f(x):\n    return x + 1\n"] * 20
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))  # fmt: skip
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    ids = [tok.encode(d) + [tok.eos_token_id] for d in docs]
    flat = torch.tensor([t for x in ids for t in x])
    rows = flat[: (len(flat) // 33) * 33].view(-1, 33)
    torch.manual_seed(0)
    model = Llama(ModelConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                              vocab_size=len(tok), max_seq_len=2048))  # fmt: skip
    _train_a_little(model, rows, 20, seed=0)
    return model, tok


def lm(tiny, batch_size: int = 4, seed: int = 1234) -> LLM360LM:
    model, tok = tiny
    return LLM360LM(model=model, tokenizer=tok, batch_size=batch_size, device="cpu", seed=seed)


def requests(gen_kwargs: dict, repeats: int = 1, prompts: list[str] = PROMPTS) -> list[Instance]:
    """Each prompt `repeats` times, as lm-eval's evaluator lists a task with `repeats: n`."""
    out = []
    for i, p in enumerate(prompts):
        out += [Instance("generate_until", {}, (p, dict(gen_kwargs)), i)] * repeats
    return out


# ---------------------------------------------------------------------------------- the adapter


def test_sampling_is_seeded_and_independent_of_batch_size_and_order(tiny):
    reqs = requests(HOT, repeats=4)
    base = lm(tiny, batch_size=4).generate_until(reqs)
    assert lm(tiny, batch_size=4).generate_until(reqs) == base  # same seed, same texts
    for bs in (1, 3, 16):
        assert lm(tiny, batch_size=bs).generate_until(reqs) == base, bs
    # any order: the k-th occurrence of a request still gets the k-th sample of that request
    order = list(range(len(reqs)))
    random.Random(0).shuffle(order)
    shuffled = lm(tiny, batch_size=3).generate_until([reqs[i] for i in order])
    by_prompt: dict[str, list[str]] = {}
    for i, text in zip(order, shuffled, strict=True):
        by_prompt.setdefault(reqs[i].args[0], []).append(text)
    for p in PROMPTS:
        expect = [t for r, t in zip(reqs, base, strict=True) if r.args[0] == p]
        assert sorted(by_prompt[p]) == sorted(expect)
    # a request's samples do not depend on the other requests in the call
    alone = lm(tiny).generate_until(requests(HOT, repeats=4, prompts=[PROMPTS[1]]))
    assert alone == base[4:8]
    # another seed, other samples
    assert lm(tiny, seed=7).generate_until(reqs) != base
    assert lm(tiny).get_model_info()["generation_seed"] == 1234


def test_repeats_of_one_request_get_different_samples(tiny):
    texts = lm(tiny).generate_until(requests(HOT, repeats=4))
    for k in range(len(PROMPTS)):
        group = texts[4 * k : 4 * k + 4]
        assert len(set(group)) >= 3, group
    assert any(t.strip() for t in texts)


def test_greedy_is_unchanged_and_zero_temperature_or_no_sampling_is_greedy(tiny):
    greedy_kwargs = {"until": ["zzzz"], "max_gen_toks": 12, "do_sample": False}
    greedy = lm(tiny).generate_until(requests(greedy_kwargs))
    assert lm(tiny, batch_size=1).generate_until(requests(greedy_kwargs)) == greedy
    for kwargs in ({**HOT, "do_sample": False},  # do_sample false wins over a temperature
                   {**HOT, "temperature": 0.0},  # do_sample true at temperature 0: greedy (as lm-eval says)
                   {"until": ["zzzz"], "max_gen_toks": 12}):  # fmt: skip
        assert lm(tiny).generate_until(requests(kwargs)) == greedy, kwargs
    # temperature -> 0: sampling concentrates on the argmax
    cold = {**HOT, "temperature": 1e-4, "top_p": 1.0}
    assert lm(tiny).generate_until(requests(cold, repeats=2)) == [t for t in greedy for _ in range(2)]
    # greedy and sampled requests in one call: the greedy ones are as if alone
    mixed = requests(greedy_kwargs) + requests(HOT, repeats=2)
    assert lm(tiny).generate_until(mixed)[: len(PROMPTS)] == greedy


def test_sample_tokens_follows_temperature_top_k_and_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 1.0]])
    n = 10_000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n  # evenly spread: counts are n * p exactly
    rows = logits.expand(n, -1)
    for temperature, top_p, top_k in (
        (1.0, 1.0, 0),
        (0.5, 1.0, 0),
        (1.0, 0.8, 0),
        (1.0, 1.0, 2),
        (2.0, 0.9, 3),
    ):
        p = torch.softmax(logits[0] / temperature, dim=0).double()
        p_sorted, order = torch.sort(p, descending=True, stable=True)
        keep = torch.ones(5, dtype=torch.bool)
        if top_k:
            keep[top_k:] = False
        keep &= (p_sorted.cumsum(0) - p_sorted) < top_p
        expect = torch.zeros(5, dtype=torch.float64)
        expect[order[keep]] = p_sorted[keep] / p_sorted[keep].sum()
        got = torch.bincount(sample_tokens(rows, u, (temperature, top_p, top_k)), minlength=5).double() / n
        assert torch.allclose(got, expect, atol=2e-4), (temperature, top_p, top_k, got, expect)
    # the tie between tokens 1 and 4 goes to the lower id first; a tiny top_p or top_k=1 is greedy
    assert sample_tokens(rows[:3], u[-3:], (1.0, 1e-6, 0)).tolist() == [0, 0, 0]
    assert sample_tokens(rows[:3], u[-3:], (1.0, 1.0, 1)).tolist() == [0, 0, 0]


def test_sampling_settings_and_request_seeds():
    assert sampling_of({"do_sample": False, "temperature": 0.0}) is None
    assert sampling_of({"do_sample": True, "temperature": 0.0}) is None
    assert sampling_of({"do_sample": True, "temperature": 0.2, "top_p": 0.95}) == (0.2, 0.95, 0)
    assert sampling_of({"do_sample": True, "temperature": 0.7, "top_k": 40}) == (0.7, 1.0, 40)
    with pytest.raises(ValueError, match="top_p"):
        sampling_of({"do_sample": True, "temperature": 0.2, "top_p": 0.0})
    seeds = {request_seed(s, c, r) for s in (0, 1) for c in ("a", "b") for r in (0, 1)}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)
    assert request_seed(0, "a", 1) == request_seed(0, "a", 1)


# ------------------------------------------------------------------------------ the code tasks


def _builtin(name: str) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(
        Path(lm_eval.__file__).parent / "tasks" / name.split("_")[0] / f"{name}.yaml", resolve_func=False
    )


def _fn(ref: str) -> str:
    """`module.function` of an unresolved `!function` reference (a path as lm-eval writes it)."""
    return ".".join(Path(ref).name.split(".")[-2:])


def test_code_sampled_preset_and_task_files():
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    specs = resolve_tasks(["code_sampled"])
    assert [(s.key, s.num_fewshot, s.primary_metric) for s in specs] == [
        ("llm360_humaneval_sampled_n20", 0, "pass@1[create_test]"),
        ("llm360_mbpp_sampled_n20", 3, "pass_at_1[all_samples]"),
    ]
    assert [s.name for s in resolve_tasks(["code"])] == ["humaneval", "mbpp"]  # greedy stays as it was
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)  # offline: indexing reads no data
    assert {"llm360_humaneval_sampled_n20", "llm360_mbpp_sampled_n20"} <= set(tm.all_tasks)

    he, mb = load_yaml(HUMANEVAL, resolve_func=False), load_yaml(MBPP, resolve_func=False)
    assert he["repeats"] == 20 and mb["repeats"] == 20
    assert {k: he["generation_kwargs"][k] for k in ("do_sample", "temperature", "top_p")} == {
        "do_sample": True, "temperature": 0.2, "top_p": 0.95}  # fmt: skip
    assert {k: mb["generation_kwargs"][k] for k in ("do_sample", "temperature", "top_p")} == {
        "do_sample": True, "temperature": 0.1, "top_p": 0.95}  # fmt: skip
    assert he["metric_list"][0]["k"] == [1]
    assert _fn(mb["filter_list"][0]["filter"][0]["filter_fn"]) == "code_sampling.all_samples"
    # everything else is lm-eval's greedy task: same data, prompt, target, stops, shots and scoring
    for ours, theirs in ((he, _builtin("humaneval")), (mb, _builtin("mbpp"))):
        for key in ("dataset_path", "dataset_name", "test_split", "doc_to_text", "doc_to_target", "num_fewshot",
                    "unsafe_code", "target_delimiter"):  # fmt: skip
            assert ours.get(key) == theirs.get(key), key
        assert ours["generation_kwargs"]["until"] == theirs["generation_kwargs"]["until"]
        assert ours["generation_kwargs"].get("max_gen_toks") == theirs["generation_kwargs"].get(
            "max_gen_toks"
        )
        assert _fn(ours["metric_list"][0]["metric"]) == _fn(theirs["metric_list"][0]["metric"])
    assert mb["fewshot_config"]["sampler"] == "first_n"
    assert _fn(mb["fewshot_config"]["samples"]) == _fn(_builtin("mbpp")["fewshot_config"]["samples"])


class _FakeCodeEval:
    """Stands in for Hugging Face's `code_eval` (not available offline): a candidate passes when it
    contains the letter "e"; pass@1 = passing / candidates, per problem, as the real estimator."""

    calls: list[list[list[str]]] = []

    def compute(self, references: list[str], predictions: list[list[str]], k: list[int]) -> tuple[dict, dict]:
        assert len(references) == len(predictions) == 1 and k == [1]
        if references != ["assert add(2, 3)==5"]:  # lm-eval's own probe when it imports the metric
            _FakeCodeEval.calls.append(predictions)
        cands = predictions[0]
        return {"pass@1": sum("e" in c for c in cands) / len(cands)}, {}


@pytest.fixture
def fake_code_eval(monkeypatch):
    import evaluate

    mods = ("lm_eval.tasks.humaneval.utils", "lm_eval.tasks.mbpp.utils")
    saved = {m: sys.modules.pop(m) for m in mods if m in sys.modules}
    monkeypatch.setattr(evaluate, "load", lambda name, *a, **kw: _FakeCodeEval())
    _FakeCodeEval.calls = []
    try:
        yield _FakeCodeEval
    finally:
        for m in mods:  # the modules imported here hold the fake; never leave them behind
            sys.modules.pop(m, None)
        sys.modules.update(saved)


@pytest.mark.parametrize("yaml_path", [HUMANEVAL, MBPP], ids=["humaneval", "mbpp"])
def test_sampled_task_scores_pass_at_1_over_all_samples(tiny, fake_code_eval, yaml_path: Path):
    """lm-eval's own pipeline on our task file (toy problems instead of the hub data, n = 4)."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks._yaml_loader import load_yaml

    n = 4
    docs = [{"task_id": i, "prompt": f"def f{i}(x):\n", "test": "def check(f): pass", "entry_point": f"f{i}",
             "text": f"the model data {i}", "code": "pass", "test_list": ["assert 1", "assert 2", "assert 3"]}
            for i in range(3)]  # fmt: skip
    cfg = load_yaml(yaml_path, resolve_func=True)
    for key in ("dataset_path", "dataset_name"):
        cfg.pop(key, None)
    cfg["custom_dataset"] = lambda **_: datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
    cfg["repeats"] = n
    cfg["generation_kwargs"] = {**cfg["generation_kwargs"], "max_gen_toks": 8, "temperature": 1.0}
    task = ConfigurableTask(config=cfg)
    model, tok = tiny
    ours = LLM360LM(model=model, tokenizer=tok, batch_size=5, device="cpu")
    with hub_access(False):
        out = evaluate(lm=ours, task_dict={"tasks": {cfg["task"]: task}, "groups": {}, "group_map": {}},
                       bootstrap_iters=0, log_samples=True, confirm_run_unsafe_code=True)  # fmt: skip
    assert out is not None
    filt = cfg["filter_list"][0]["name"]
    samples = out["samples"][cfg["task"]]
    assert len(samples) == len(docs) and len(fake_code_eval.calls) == len(docs)
    expect = []
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        (cands,), (resps,) = s["filtered_resps"], s["resps"]  # one request per problem, its n samples
        assert len(cands) == len(resps) == n and len(set(resps)) > 1  # every sample is scored, not the first
        expect.append(sum("e" in c for c in cands) / n)
    metric = "pass@1" if yaml_path == HUMANEVAL else "pass_at_1"
    assert out["results"][cfg["task"]][f"{metric},{filt}"] == pytest.approx(sum(expect) / len(expect))


def test_the_generation_seed_is_a_config_field_and_part_of_a_result_signature():
    from llm360.config import EvalConfig
    from llm360.eval.pairs import signature
    from llm360.eval.specs import resolve_tasks

    spec = next(s for s in resolve_tasks(["code_sampled"]) if "humaneval" in s.name)
    a, b = EvalConfig(), EvalConfig(generation_seed=7)
    assert a.generation_seed == 1234
    assert signature(spec, a)["generation_seed"] == 1234 and signature(spec, a) != signature(spec, b)
