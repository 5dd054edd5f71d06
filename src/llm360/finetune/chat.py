"""The chat template: how a conversation becomes the one string the model is trained on.

Tokenizers trained by ``llm360 prepare`` have no chat template. llm360 adds this one, which spells
its role markers as plain text, so no token is added and the embedding matrix keeps its size::

    <|system|>
    You are a helpful assistant.
    <|user|>
    What does `assert` do?
    <|assistant|>
    It checks a condition while debugging.<|endoftext|><|user|>
    ...

Each turn is ``<|ROLE|>`` + newline + content; a user or system turn ends with a newline, an
assistant turn with the tokenizer's EOS token (whatever it is called), so a model stops where its
answer ends and generation can use the EOS token as its stop token. ``add_generation_prompt``
appends ``<|assistant|>`` + newline. The assistant content and its EOS sit inside
``{% generation %}`` so ``assistant`` loss masks can be computed from it. The prompt alone renders
as a prefix of the prompt with its answer, so prompt and completion split on a token boundary.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from llm360.errors import DataError

TEMPLATE_NAME = "llm360-plain-v1"
"""Name of :data:`CHAT_TEMPLATE` as recorded in lineage.json."""

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|' + message['role'] + '|>\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + eos_token }}{%- endgeneration %}"
    "{%- else %}"
    "{{- message['content'] + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)
"""llm360's plain-text chat template (Jinja, as transformers' ``apply_chat_template`` reads it)."""

_PROBE = "<|system|>\ns\n<|user|>\nHello, world?\n<|assistant|>\n"


def template_sha256(template: str) -> str:
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def ensure_chat_template(tokenizer: Any, setting: str, *, where: str) -> dict[str, str]:
    """Give `tokenizer` a chat template according to `setting` (auto, llm360, or a Jinja file path).

    Returns ``{"source": ..., "sha256": ...}`` for the lineage. Raises DataError when the tokenizer
    has no template and llm360's cannot be added (no EOS token, or markers it cannot spell), or
    when the Jinja file is missing. `where` names the tokenizer's folder in messages.
    """
    if (
        setting == "auto"
        and isinstance(getattr(tokenizer, "chat_template", None), str)
        and tokenizer.chat_template
    ):
        return {"source": "tokenizer", "sha256": template_sha256(tokenizer.chat_template)}
    if setting not in ("auto", "llm360"):
        path = Path(setting)
        if not path.is_file():
            raise DataError(
                f"chat_template = {setting!r}: no such file; give a Jinja file, or `auto` / `llm360`"
            )
        try:
            tokenizer.chat_template = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"chat_template file {path}: cannot read it ({e})") from None
        return {"source": str(path.resolve()), "sha256": template_sha256(tokenizer.chat_template)}
    problem = _cannot_add(tokenizer)
    if problem:
        raise DataError(
            f"the tokenizer in {where} has no chat template and llm360's plain-text one cannot be added: {problem}. "
            "Give a template that suits it with `finetune.<kind>.chat_template=PATH.jinja`, or train on plain "
            "prompt/completion strings with `finetune.<kind>.format=raw`"
        )
    tokenizer.chat_template = CHAT_TEMPLATE
    return {"source": TEMPLATE_NAME, "sha256": template_sha256(CHAT_TEMPLATE)}


def _cannot_add(tokenizer: Any) -> str:
    """Why llm360's template does not fit this tokenizer ('' when it does)."""
    eos = getattr(tokenizer, "eos_token", None)
    if not eos or tokenizer.convert_tokens_to_ids(eos) is None:
        return "it has no EOS token to end assistant turns with"
    ids = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk in ids:
        return "it maps the role markers `<|user|>` / `<|assistant|>` to its unknown token"
    back = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    if back != _PROBE:
        return f"it does not spell the role markers back exactly ({_PROBE!r} decodes as {back!r})"
    return ""
