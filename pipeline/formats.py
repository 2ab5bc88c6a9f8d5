"""The three input formats, normalised to (prompt text, chosen text, rejected text).

Every way a record can be unusable raises `RowError` with a reason a person can
act on; the reason lands in rejects.jsonl beside the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

HH_ASSISTANT = "\n\nAssistant:"


class RowError(ValueError):
    pass


@dataclass(frozen=True)
class TextPair:
    prompt: str
    chosen: str
    rejected: str
    templated: bool  # the prompt came out of a chat template, which adds its own special tokens


def _field(record: dict, name: str, kind: type) -> Any:
    if name not in record:
        raise RowError(f"missing field '{name}'")
    value = record[name]
    if value is None:
        raise RowError(f"field '{name}' is null")
    if not isinstance(value, kind):
        want = "a string" if kind is str else "a list of messages"
        raise RowError(f"field '{name}' must be {want}, got {type(value).__name__}")
    return value


def _nonempty(reply: str, which: str) -> str:
    if not reply.strip():
        raise RowError(f"empty {which} reply")
    return reply


def explicit(record: dict) -> TextPair:
    prompt = _field(record, "prompt", str)
    chosen = _nonempty(_field(record, "chosen", str), "chosen")
    rejected = _nonempty(_field(record, "rejected", str), "rejected")
    return TextPair(prompt, chosen, rejected, templated=False)


def implicit(record: dict) -> TextPair:
    """Anthropic HH: the prompt is the shared text up to and including the last "\\n\\nAssistant:"."""
    chosen = _field(record, "chosen", str)
    rejected = _field(record, "rejected", str)
    cut_c, cut_r = chosen.rfind(HH_ASSISTANT), rejected.rfind(HH_ASSISTANT)
    if cut_c < 0 or cut_r < 0:
        which = "chosen" if cut_c < 0 else "rejected"
        raise RowError(f"the {which} transcript has no '\\n\\nAssistant:' turn, so no prompt can be split off")
    prompt = chosen[: cut_c + len(HH_ASSISTANT)]
    if rejected[: cut_r + len(HH_ASSISTANT)] != prompt:
        raise RowError("chosen and rejected transcripts differ before the last Assistant reply")
    return TextPair(
        prompt,
        _nonempty(chosen[len(prompt):], "chosen"),
        _nonempty(rejected[len(prompt):], "rejected"),
        templated=False,
    )


def _messages(value: Any, name: str) -> list[dict]:
    if not isinstance(value, list):
        raise RowError(f"field '{name}' must be a list of messages, got {type(value).__name__}")
    if not value:
        raise RowError(f"field '{name}' is an empty list of messages")
    for i, msg in enumerate(value, start=1):
        if not isinstance(msg, dict):
            raise RowError(f"message {i} of '{name}' is a {type(msg).__name__}, not an object")
        if not isinstance(msg.get("role"), str):
            raise RowError(f"message {i} of '{name}' has no string 'role'")
        if not isinstance(msg.get("content"), str):
            raise RowError(f"message {i} of '{name}' has no string 'content'")
    return value


def conversational(record: dict, tokenizer) -> TextPair:
    """Chat messages rendered with the tokenizer's chat template.

    The reply text is what the template adds after the prompt's generation prompt,
    so the prompt is, by construction, a prefix of the rendered conversation; a
    template that renders the prompt differently inside the whole conversation
    cannot be split and the row is rejected.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise RowError("conversational row, but the tokenizer has no chat template; set model.tokenizer")
    chosen = _messages(record.get("chosen"), "chosen")
    rejected = _messages(record.get("rejected"), "rejected")
    if "prompt" in record:
        prompt = _messages(record.get("prompt"), "prompt")
    else:
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            raise RowError("chosen and rejected share no leading messages, so no prompt can be split off")
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        if not chosen or not rejected:
            raise RowError("chosen and rejected conversations are identical up to the end of one of them")
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if reply[0]["role"] != "assistant":
            raise RowError(f"the {name} reply starts with a '{reply[0]['role']}' message, not 'assistant'")
        if not any(m["content"].strip() for m in reply):
            raise RowError(f"empty {name} reply")
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    replies = []
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        full = tokenizer.apply_chat_template(prompt + reply, tokenize=False)
        if not full.startswith(prompt_text):
            raise RowError(f"the chat template renders the prompt differently inside the {name} conversation")
        text = full[len(prompt_text):]
        eos = tokenizer.eos_token
        if eos and text.endswith(eos):
            text = text[: -len(eos)]  # EOS is appended as a token id, never twice
        replies.append(text)
    return TextPair(prompt_text, replies[0], replies[1], templated=True)


def normalise(record: dict, fmt: Optional[str], tokenizer) -> TextPair:
    if fmt == "explicit":
        return explicit(record)
    if fmt == "implicit":
        return implicit(record)
    if fmt == "conversational":
        return conversational(record, tokenizer)
    raise RowError(
        "cannot tell the row's format: expected prompt/chosen/rejected, or chosen/rejected; "
        "set data.format if the file mixes formats"
    )
