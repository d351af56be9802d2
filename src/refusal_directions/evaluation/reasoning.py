"""Completions of reasoning models: the thinking section and the answer after it.

Chat templates of reasoning models (Qwen3, DeepSeek-R1 and their distillations) let the model
write a thinking section ``<think> ... </think>`` before its answer. Judges should read the
*answer*: a refusal phrase or harmful content inside the thinking is not what the user is shown
(``judged_text(..., part="both")`` reads both, for judges that want the reasoning too).

``split_thinking(text)`` returns ``(thinking, answer)``, both stripped of surrounding whitespace:

* ``"<think>T</think>A"`` -> ``("T", "A")`` (leading whitespace before ``<think>`` is ignored);
* ``"<think>T"`` with no closing tag (the token budget ran out while thinking) -> ``("T", "")``:
  there is no answer;
* ``"T</think>A"`` with no opening tag (the template pre-fills ``<think>`` after the assistant
  header, as DeepSeek-R1's does, so the completion starts inside the thinking) -> ``("T", "A")``;
* no tag at all -> ``("", text)``, unless ``prefilled=True`` (the template pre-fills ``<think>``
  and the model never closed it) -> ``(text, "")``;
* an empty section ``"<think>\\n\\n</think>\\n\\nA"`` (Qwen3 with ``enable_thinking=False`` writes
  it into the prompt; a model may also write it) -> ``("", "A")``.

The first closing tag ends the thinking; everything after it is the answer (tags inside the
answer are left as they are). ``thinking_status`` says which case applied: ``"none"`` (no
thinking section), ``"closed"`` or ``"unclosed"``.

The tags must survive decoding: completions are decoded with ``skip_special_tokens=True``, which
keeps ``<think>``/``</think>`` only when the tokenizer does not mark them special (Qwen3 and
DeepSeek-R1 do not).
"""

from __future__ import annotations

from typing import Literal, Sequence

OPEN_TAG = "<think>"
CLOSE_TAG = "</think>"

Part = Literal["answer", "thinking", "both"]
ThinkingStatus = Literal["none", "closed", "unclosed"]


def _split(text: str, prefilled: bool, open_tag: str, close_tag: str) -> tuple[str, str, ThinkingStatus]:
    body = text.lstrip()
    opened = body.startswith(open_tag)
    if opened:
        body = body[len(open_tag) :]
    end = body.find(close_tag)
    if end >= 0:
        return body[:end].strip(), body[end + len(close_tag) :].strip(), "closed"
    if opened or prefilled:
        return body.strip(), "", "unclosed"
    return "", text.strip(), "none"


def split_thinking(
    text: str, *, prefilled: bool = False, open_tag: str = OPEN_TAG, close_tag: str = CLOSE_TAG
) -> tuple[str, str]:
    """``(thinking, answer)`` of one completion (see the module docstring for every case)."""
    thinking, answer, _ = _split(text, prefilled, open_tag, close_tag)
    return thinking, answer


def thinking_status(
    text: str, *, prefilled: bool = False, open_tag: str = OPEN_TAG, close_tag: str = CLOSE_TAG
) -> ThinkingStatus:
    """``"none"`` (no thinking section), ``"closed"`` (an answer follows) or ``"unclosed"`` (no answer)."""
    return _split(text, prefilled, open_tag, close_tag)[2]


def judged_text(
    text: str,
    part: Part = "answer",
    *,
    prefilled: bool = False,
    open_tag: str = OPEN_TAG,
    close_tag: str = CLOSE_TAG,
) -> str:
    """The part of a completion a judge reads: the answer (default), the thinking, or both.

    ``"both"`` is the thinking and the answer joined by a blank line, without the tags (either
    may be empty; then the other alone is returned).
    """
    thinking, answer = split_thinking(text, prefilled=prefilled, open_tag=open_tag, close_tag=close_tag)
    if part == "answer":
        return answer
    if part == "thinking":
        return thinking
    if part == "both":
        return "\n\n".join(p for p in (thinking, answer) if p)
    raise ValueError(f"part must be 'answer', 'thinking' or 'both', not {part!r}")


def judged_texts(
    texts: Sequence[str],
    part: Part = "answer",
    *,
    prefilled: bool = False,
    open_tag: str = OPEN_TAG,
    close_tag: str = CLOSE_TAG,
) -> list[str]:
    """``judged_text`` of every completion."""
    return [judged_text(t, part, prefilled=prefilled, open_tag=open_tag, close_tag=close_tag) for t in texts]


def has_thinking_section(texts: Sequence[str], *, open_tag: str = OPEN_TAG, close_tag: str = CLOSE_TAG) -> bool:
    """True when any completion holds a thinking tag (then the judges should read ``judged_texts``)."""
    return any(open_tag in t or close_tag in t for t in texts)
