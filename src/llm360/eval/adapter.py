"""lm-eval's view of an llm360 model: the ``llm360`` model type, running our Llama in-process.

lm-eval does the prompting and the scoring; this class only answers its three kinds of request
with our model, exactly as lm-eval's own ``hf`` model (``HFLM``) would with transformers':

* ``loglikelihood`` -- (context, continuation) -> (sum of log p(continuation), is it greedy);
  context and continuation are encoded together and split (``TemplateLM``), the pair is cut to
  the last ``max_length + 1`` tokens, batches are sorted by length and padded on the right.
* ``loglikelihood_rolling`` -- the log-likelihood of a whole text in windows of ``max_length``
  tokens, each token predicted once (lm-eval's rolling windows).
* ``generate_until`` -- continuation with the KV cache until a stop string, EOS or
  ``max_gen_toks``. Prompts of any lengths share a batch (sorted by length, longest first): they
  are padded on the right and prefilled once, then every row decodes at its own position
  (``llm360.model.llama.decode_step``), so padding is never attended; rows that are done leave
  the batch. Greedy unless the request samples (below).

Sampling. A request whose generation kwargs sample (``do_sample: true`` with ``temperature > 0``,
or a ``temperature > 0`` without ``do_sample``, as lm-eval normalises them) draws each token from
softmax(logits / temperature), cut to ``top_k`` and ``top_p`` (nucleus, as transformers' warpers)
when given. Every request has its own ``torch.Generator`` (on the CPU, so the random numbers are the
same on any device), seeded from ``seed``, the request's context and its index among identical
requests (same context and generation kwargs: lm-eval's ``repeats: n`` sends n of them, and each
gets its own sample). A sample therefore depends only on (seed, context, index, model), never on the
batch size or the order of the requests; the same seed gives the same texts. ``do_sample: false``
or ``temperature: 0`` is greedy, bit for bit the greedy path.

The tokenizer is ``transformers.AutoTokenizer`` on the checkpoint folder, the one ``HFLM`` loads,
so both models see the same token ids. ``tests/test_eval.py`` checks the two give the same scores.

Use it directly (``simple_evaluate(model=LLM360LM("run/checkpoints/ckpt_003"), ...)``), or by name
once this module is imported: ``lm_eval.api.registry.get_model("llm360")``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from llm360.errors import ConfigError
from llm360.log import progress
from llm360.model.llama import KVCache, Llama, decode_step
from llm360.model.load import load_model, load_tokenizer, resolve_device

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}  # fmt: skip
_CHECK_EVERY = 8
"""New tokens generated between looks for stop strings (rows that stopped then leave the batch)."""
DEFAULT_SEED = 1234
"""Seed of sampled generations when none is given (``seed=`` in lm-eval's ``--model_args``)."""
_SAMPLING_KEYS = {"do_sample", "temperature", "top_p", "top_k"}
"""Generation kwargs this model understands besides ``until`` and ``max_gen_toks``."""

Sampling = tuple[float, float, int]
"""(temperature > 0, top_p in (0, 1], top_k >= 0 with 0 = all tokens) of a sampled request."""


def request_seed(seed: int, context: str, repeat: int) -> int:
    """The seed of one sampled request: a 63-bit hash of (seed, repeat index, context)."""
    digest = hashlib.sha256(f"{int(seed)}\x00{int(repeat)}\x00{context}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def sampling_of(kwargs: dict[str, Any]) -> Sampling | None:
    """A request's sampling settings from its normalised generation kwargs; None means greedy.

    Raises ValueError for a top_p outside (0, 1] or a negative top_k (a broken task config).
    """
    temperature = float(kwargs.get("temperature") or 0.0)
    if not kwargs.get("do_sample") or temperature <= 0.0:
        return None
    top_p = float(kwargs.get("top_p") if kwargs.get("top_p") is not None else 1.0)
    top_k = int(kwargs.get("top_k") or 0)
    if not 0.0 < top_p <= 1.0 or top_k < 0:
        raise ValueError(f"generation kwargs top_p={top_p}, top_k={top_k}: expected 0 < top_p <= 1 and top_k >= 0")
    return temperature, top_p, top_k


def sample_tokens(logits_NV: torch.Tensor, u_N: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """One token per row drawn from softmax(logits / temperature) cut to top_k / top_p, by inverse CDF.

    ``u_N`` holds one uniform number in [0, 1) per row (float64); the token is the first, in order
    of falling probability (ties by token id), whose cumulative kept mass exceeds u times the kept
    total. top_p keeps the most likely tokens while the mass before them is below top_p (at least
    one), as transformers' ``TopPLogitsWarper``.
    """
    temperature, top_p, top_k = sampling
    probs_NV = torch.softmax(logits_NV.float() / temperature, dim=-1)
    p_NV, order_NV = torch.sort(probs_NV, dim=-1, descending=True, stable=True)
    keep_NV = torch.ones_like(p_NV, dtype=torch.bool)
    if top_k:
        keep_NV[:, top_k:] = False
    if top_p < 1.0:
        keep_NV &= (p_NV.cumsum(dim=-1) - p_NV) < top_p
    keep_NV[:, 0] = True
    cdf_NV = (p_NV * keep_NV).double().cumsum(dim=-1)
    target_N1 = (u_N.to(cdf_NV.device, torch.float64) * cdf_NV[:, -1])[:, None]
    j_N1 = torch.searchsorted(cdf_NV, target_N1, right=True)
    j_N1 = torch.minimum(j_N1, keep_NV.sum(dim=-1, keepdim=True) - 1)  # u * total rounded up to total
    return order_NV.gather(1, j_N1)[:, 0]


def _sampler(
    sampling: Sampling, seeds: list[int], rows: int
) -> Callable[[torch.Tensor, list[int]], torch.Tensor]:
    """(logits of the active rows, their prompt numbers) -> one sampled token per row.

    Prompt r draws from its own CPU generator seeded with seeds[r], one number per token.
    """
    if len(seeds) != rows:
        raise ValueError(f"sampled generation needs one seed per prompt: {len(seeds)} seeds for {rows} prompts")
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def pick(logits_NV: torch.Tensor, active: list[int]) -> torch.Tensor:
        u_N = torch.cat([torch.rand(1, generator=gens[r], dtype=torch.float64) for r in active])
        return sample_tokens(logits_NV, u_N, sampling)

    return pick


@register_model("llm360")
class LLM360LM(TemplateLM):
    """An llm360 Llama as an lm-eval model (see the module docstring)."""

    def __init__(
        self,
        pretrained: str | os.PathLike[str] | None = None,
        *,
        model: Llama | None = None,
        tokenizer: str | os.PathLike[str] | Any | None = None,
        batch_size: int | str | None = 16,
        device: str | None = None,
        dtype: str | torch.dtype = "float32",
        max_length: int | None = None,
        max_gen_toks: int = 256,
        seed: int = DEFAULT_SEED,
        **unused: Any,
    ) -> None:
        """Load ``pretrained`` (a checkpoint or Hugging Face folder), or wrap a loaded ``model``.

        ``tokenizer`` is a folder or a loaded transformers tokenizer; default: ``pretrained``.
        ``max_length`` defaults to the model's ``max_seq_len``. ``batch_size`` is in sequences.
        ``seed`` seeds sampled generations (see the module docstring); greedy ones ignore it.
        """
        super().__init__()
        unused = {k: v for k, v in unused.items() if v is not None and k != "max_batch_size"}
        if unused:
            logger.warning("llm360 lm-eval model: ignoring unknown arguments %s", sorted(unused))
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ConfigError(f"dtype {dtype!r}: expected one of {sorted(_DTYPES)}")
            dtype = _DTYPES[dtype]
        self._device = resolve_device(device, where="device (llm360 lm-eval model)")
        if model is None:
            if pretrained is None:
                raise ConfigError("the llm360 lm-eval model needs `pretrained` (a checkpoint folder) or `model`")
            model = load_model(pretrained, dtype, self._device)
        else:
            model = model.to(device=self._device, dtype=dtype).eval()
        self.model = model
        if tokenizer is None:
            if pretrained is None:
                raise ConfigError("the llm360 lm-eval model needs a `tokenizer` when given a loaded `model`")
            tokenizer = pretrained
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        if self.tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has no EOS token; lm-eval needs one to end generations")
        self.pretrained = str(pretrained) if pretrained is not None else None
        if batch_size in (None, "auto") or str(batch_size).startswith("auto"):
            logger.warning("llm360 lm-eval model: batch_size=%s is not supported, using 16", batch_size)
            batch_size = 16
        self._batch_size = max(1, int(batch_size))  # type: ignore[arg-type]
        self._max_length = int(max_length or model.cfg.max_seq_len or 2048)
        self._max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self._warned_kwargs: set[str] = set()

    # ------------------------------------------------------------------ properties lm-eval reads
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        # Conditioning token for an empty context: BOS when the tokenizer has one, else EOS (as HFLM).
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "llm360")).replace("/", "__")

    def get_model_info(self) -> dict:
        """What lm-eval records about the model in its results."""
        return {
            "model_class": "llm360.model.llama.Llama",
            "checkpoint": self.pretrained,
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(next(self.model.parameters()).dtype),
            "max_length": self.max_length,
            "generation_seed": self.seed,
        }

    # ------------------------------------------------------------------ tokens
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of string; special tokens as the tokenizer adds them unless told (as HFLM)."""
        special: dict[str, bool] = {}
        if add_special_tokens is not None:
            special["add_special_tokens"] = add_special_tokens
        elif string.startswith(self.tokenizer.decode([self.prefix_token_id])):
            special["add_special_tokens"] = False  # the text already starts with the prefix token
        ids = self.tokenizer.encode(string, **special)
        left = kwargs.get("left_truncate_len")
        return ids[-left:] if left else ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _encode_prompt(self, text: str) -> list[int]:
        # generate_until prompts: as HFLM's tok_batch_encode (no extra BOS when the text has one)
        bos = getattr(self.tokenizer, "bos_token", None)
        if bos and text.startswith(bos):
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(text)

    # ------------------------------------------------------------------ loglikelihood
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """lm-eval's encoding of (context, continuation) pairs, then ours; no tqdm (we show progress)."""
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    @torch.no_grad()
    def _logprobs(self, ids_BT: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.model(ids_BT).float(), dim=-1)

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether every continuation token is the argmax)."""
        n = len(requests)
        # longest first: the first batch shows the worst-case memory, as in HFLM
        order = sorted(range(n), key=lambda i: (-len(requests[i][1]) - len(requests[i][2]), i))
        bs = override_bs or self.batch_size
        out: list[tuple[float, bool] | None] = [None] * n
        L = self.max_length
        with progress("loglikelihood", total=n, unit="requests") as bar:
            for start in range(0, n, bs):
                batch = order[start : start + bs]
                inputs: list[list[int]] = []
                for i in batch:
                    _, ctx, cont = requests[i]
                    if not ctx or not cont:
                        raise ValueError("loglikelihood request with an empty context or continuation")
                    if len(cont) > L:
                        raise ValueError(
                            f"an answer of {len(cont)} tokens does not fit the model's context of {L} tokens "
                            "(model.max_seq_len); this task needs a model with a longer context"
                        )
                    inputs.append((ctx + cont)[-(L + 1) :][:-1])
                width = max(len(x) for x in inputs)
                ids_BT = torch.zeros((len(batch), width), dtype=torch.long)
                for row, x in enumerate(inputs):
                    ids_BT[row, : len(x)] = torch.tensor(x)  # right padding: earlier positions never see it
                logp_BTV = self._logprobs(ids_BT.to(self.device))
                for row, i in enumerate(batch):
                    key, _, cont = requests[i]
                    inplen, contlen = len(inputs[row]), len(cont)
                    logp_CV = logp_BTV[row, inplen - contlen : inplen]
                    cont_C = torch.tensor(cont, device=logp_CV.device)
                    greedy = bool((logp_CV.argmax(dim=-1) == cont_C).all())
                    answer = (float(logp_CV.gather(1, cont_C[:, None]).sum()), greedy)
                    out[i] = answer
                    if key is not None:
                        self.cache_hook.add_partial("loglikelihood", key, answer)
                bar.advance(len(batch))
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text, in disjoint windows of at most max_length tokens."""
        windows: list[tuple[None, list[int], list[int]]] = []
        owner: list[int] = []
        for r, req in enumerate(requests):
            (text,) = req.args
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1,
            )):  # fmt: skip
                windows.append((None, ctx, cont))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows)
        totals = [0.0] * len(requests)
        for r, (ll, _) in zip(owner, scores, strict=True):
            totals[r] += ll
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continuations, cut at the first stop string (``until``, EOS) or max_gen_toks.

        Greedy, or sampled with a per-request seed when the request's kwargs sample (see the module
        docstring). Raises ValueError when a task asks for more new tokens than the context holds.
        """
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        buckets: dict[str, list[int]] = defaultdict(list)
        prepared: list[tuple[list[int], list[str], int, Sampling | None, int | None]] = []
        seen: dict[str, int] = defaultdict(int)  # identical requests so far: the next one's repeat index
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = int(kwargs.pop("max_gen_toks"))
            sampling = sampling_of(kwargs)
            for extra in sorted(set(kwargs) - _SAMPLING_KEYS - self._warned_kwargs):
                logger.warning("llm360 lm-eval model: generation kwarg %r is not supported and is ignored", extra)
                self._warned_kwargs.add(extra)
            seed = None
            if sampling is not None:
                ident = json.dumps([context, gen_kwargs], sort_keys=True, default=repr)
                seed = request_seed(self.seed, context, seen[ident])
                seen[ident] += 1
            max_ctx = self.max_length - max_gen
            if max_ctx <= 0:
                raise ValueError(
                    f"the task asks for up to {max_gen} new tokens, but the model's context is only "
                    f"{self.max_length} tokens; lower the task's max_gen_toks"
                )
            ids = self._encode_prompt(context)[-max_ctx:] or [self.prefix_token_id]
            prepared.append((ids, until, max_gen, sampling, seed))
            buckets[repr((sorted(until), max_gen, sampling))].append(i)
        out: list[str | None] = [None] * len(requests)
        with progress("generate", total=len(requests), unit="requests") as bar:
            for members in buckets.values():
                members.sort(key=lambda i: (-len(prepared[i][0]), i))  # longest first, little padding
                for start in range(0, len(members), self.batch_size):
                    batch = members[start : start + self.batch_size]
                    _, until, max_gen, sampling, _ = prepared[batch[0]]
                    seeds = [int(prepared[i][4] or 0) for i in batch] if sampling is not None else None
                    texts = self._generate([prepared[i][0] for i in batch], until, max_gen, sampling, seeds)
                    for i, text in zip(batch, texts, strict=True):
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.advance(len(batch))
        return out  # type: ignore[return-value]

    def _stopped(self, new_ids: list[int], until: list[str]) -> bool:
        if self.eot_token_id in new_ids:
            return True
        text = self.tok_decode(new_ids, skip_special_tokens=False)
        return any(s and s in text for s in until)

    @torch.no_grad()
    def _generate(
        self,
        prompts: list[list[int]],
        until: list[str],
        max_gen: int,
        sampling: Sampling | None = None,
        seeds: list[int] | None = None,
    ) -> list[str]:
        """Continuations of prompts of any lengths in one batch, each cut at its first stop.

        Greedy, or (``sampling`` given) sampled with one generator per prompt seeded by ``seeds``:
        each row draws one uniform number per token from its own generator, so a row's sample does
        not depend on the other rows of the batch.

        The prompts, padded on the right, run once through the model and fill a KV cache (attention
        is causal: no real position sees the padding). Then each row decodes at its own position,
        writing over its padding and attending only up to itself. Every _CHECK_EVERY tokens, rows
        that hit a stop leave the batch (their cache rows are dropped).
        """
        model, dev = self.model, self.device
        lengths = [len(p) for p in prompts]
        ids_BT = torch.zeros((len(prompts), max(lengths)), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids_BT[r, : len(p)] = torch.tensor(p)
        param = next(model.parameters())
        cache = KVCache(model.cfg, len(prompts), ids_BT.shape[1] + max_gen, dev, param.dtype)
        h_BTD = model.model(ids_BT.to(dev), cache)
        pos_n = torch.tensor(lengths, device=dev)  # where each row's next token goes
        pick = None if sampling is None else _sampler(sampling, seeds or [], len(prompts))
        logits_NV = model._head(h_BTD[torch.arange(len(prompts), device=dev), pos_n - 1])
        tok_n = logits_NV.argmax(dim=-1) if pick is None else pick(logits_NV, list(range(len(prompts))))
        k_cache, v_cache = cache.k_BKSE, cache.v_BKSE
        new: list[list[int]] = [[] for _ in prompts]
        active = list(range(len(prompts)))  # the prompt each batch row belongs to
        for produced in range(1, max_gen + 1):
            for r, t in zip(active, tok_n.tolist(), strict=True):
                new[r].append(t)
            if produced == max_gen:
                break
            if produced % _CHECK_EVERY == 0:
                keep = [j for j, r in enumerate(active) if not self._stopped(new[r], until)]
                if not keep:
                    break
                if len(keep) < len(active):
                    idx = torch.tensor(keep, device=dev)
                    k_cache = [k[idx] for k in k_cache]
                    v_cache = [v[idx] for v in v_cache]
                    tok_n, pos_n, active = tok_n[idx], pos_n[idx], [active[j] for j in keep]
            logits_NV = decode_step(model, tok_n, pos_n, k_cache, v_cache)
            tok_n = logits_NV.argmax(dim=-1) if pick is None else pick(logits_NV, active)
            pos_n = pos_n + 1
        texts = []
        for ids in new:
            if self.eot_token_id in ids:
                ids = ids[: ids.index(self.eot_token_id)]
            texts.append(postprocess_generated_text(self.tok_decode(ids), until, None))
        return texts
