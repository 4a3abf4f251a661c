"""A text reply as it streams: the committed tokens, the text shown after each forward's run, and why it ended.
Every method commits runs of several tokens, so generate's ``stop_strings`` must cut a run at the token that
completes a string, a final EOS must not show, and the per-run texts must be cut from the final text (decoding a
token alone splits characters across tokens); one object does this the same way for every method."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class StopStrings:
    """generate's ``stop_strings`` on a streamed output: the output ends with the token that completes the first
    stop string to appear in the decoded text; the text shown ends with the string itself. Only the tail that
    can hold a stop string is decoded after each token, so the check does not grow with the output."""

    def __init__(self, tokenizer: Any, strings: list[str]) -> None:
        self.tokenizer, self.strings = tokenizer, list(strings)
        self.window = max((len(text) for text in self.strings), default=0) + 4  # tokens: >= 1 character each
        self.matched: str | None = None

    def cut(self, tokens: list[int], run: list[int]) -> list[int]:
        """``run`` up to the token that completes a stop string after ``tokens`` (all of it when none does)."""
        if not self.strings:
            return run
        for i in range(len(run)):
            tail = (tokens[-self.window:] + run[:i + 1])[-self.window:]
            text = self.tokenizer.decode(tail, skip_special_tokens=True)
            self.matched = next((stop for stop in self.strings if stop in text), None)
            if self.matched is not None:
                return run[:i + 1]
        return run

    def trim(self, text: str) -> str:
        """The output text cut right after the matched stop string."""
        if self.matched is None or self.matched not in text:
            return text
        return text[:text.rindex(self.matched) + len(self.matched)]


@dataclass
class Reply:
    """What a request has streamed so far; ``add`` commits a forward's accepted run."""
    tokenizer: Any
    eos_ids: set[int]
    stops: StopStrings
    tokens: list[int] = field(default_factory=list)
    runs: list[list[int]] = field(default_factory=list)
    run_ends: list[int] = field(default_factory=list)  # characters of the shown text after each run

    def add(self, run: list[int]) -> str:
        """Commit ``run`` (cut at a stop string) and return the text shown now."""
        run = self.stops.cut(self.tokens, run)
        self.tokens.extend(run)
        self.runs.append(run)
        text = self.text()
        self.run_ends.append(len(text))
        return text

    def text(self) -> str:
        """The shown text: special tokens and a final EOS left out, cut after a matched stop string."""
        shown = self.tokens[:-1] if self.tokens and self.tokens[-1] in self.eos_ids else self.tokens
        return self.stops.trim(self.tokenizer.decode(shown, skip_special_tokens=True))

    def stopped_by(self) -> str:
        """Why the output ended, in the result's stats."""
        if self.stops.matched is not None:
            return "stop string"
        return "eos" if self.tokens and self.tokens[-1] in self.eos_ids else "max new tokens"


def run_texts(text: str, run_ends: list[int]) -> list[str]:
    """The shown text cut where each forward's accepted run ended (special tokens already stripped). Cutting
    the final text, not decoding each token alone, keeps characters split across tokens whole."""
    texts, start = [], 0
    for end in run_ends:
        end = min(max(end, start), len(text))
        texts.append(text[start:end])
        start = end
    if texts and start < len(text):
        texts[-1] += text[start:]
    return texts
