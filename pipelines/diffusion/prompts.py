"""Prompt parsing for the image controls, with no downloaded parser model.

- Groups (ToMe binding): ``a [red hat] and a [blue car]`` marks object+attribute groups explicitly; without
  brackets an adjective-noun heuristic finds them (split into noun phrases at conjunctions, prepositions,
  verbs and punctuation; the last word of a phrase is its noun, the words before it its attributes). The
  official ToMe code uses spaCy ``en_core_web_trf``, which no package registry ships.
- Style (LPA): ``... in watercolor style`` / ``in the style of X`` / ``in X aesthetic``, or an explicit field.
- Token positions: CLIP pre-tokenizes word by word, so a character span maps to token positions by counting
  the tokens of the text before it (position 0 is the start token).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

WORD = re.compile(r"[A-Za-z0-9]+(?:[-'][A-Za-z0-9]+)*")
DETERMINERS = {"a", "an", "the", "one", "two", "three", "four", "five", "some", "this", "that", "these", "those",
               "his", "her", "its", "their", "my", "your", "our", "several", "many", "few"}
SEPARATORS = {"and", "or", "with", "without", "on", "in", "of", "at", "by", "next", "to", "near", "under",
              "over", "above", "below", "behind", "beside", "besides", "between", "inside", "outside", "from",
              "into", "onto", "is", "are", "was", "were", "has", "have", "while", "who", "which", "that", "for",
              "photo", "picture", "image", "painting", "drawing", "left", "right", "front"}
STOPWORDS = DETERMINERS | SEPARATORS - {"photo", "picture", "image", "painting", "drawing", "left", "right", "front"}
STYLE_PATTERNS = (
    re.compile(r"\bin the style of (?P<style>[^,.;]+)", re.IGNORECASE),
    re.compile(r"\bin (?:an? |the )?(?P<style>[^,.;]+?) (?:style|aesthetic)\b", re.IGNORECASE),
)


@dataclass
class Span:
    text: str
    start: int
    end: int


@dataclass
class Group:
    """One object and its attributes (e.g. noun "hat", attributes ["red"])."""

    noun: Span
    attributes: list[Span]

    @property
    def phrase(self) -> str:
        return " ".join([a.text for a in self.attributes] + [self.noun.text])


@dataclass
class ParsedPrompt:
    text: str
    groups: list[Group] = field(default_factory=list)
    style: Span | None = None
    style_phrase: tuple[int, int] | None = None  # the whole "in ... style" phrase, excluded from content


def words(text: str, start: int = 0, end: int | None = None) -> list[Span]:
    end = len(text) if end is None else end
    return [Span(m.group(0), m.start(), m.end()) for m in WORD.finditer(text, start, end)]


def phrase_group(spans: list[Span]) -> Group | None:
    content = [s for s in spans if s.text.lower() not in DETERMINERS]
    if not content:
        return None
    return Group(noun=content[-1], attributes=content[:-1])


def explicit_groups(prompt: str) -> tuple[str, list[Group]] | None:
    """Strip ``[...]`` markers; each bracketed phrase is one group. None when the prompt has no markers."""
    if "[" not in prompt:
        return None
    clean, spans, cursor = [], [], 0
    for match in re.finditer(r"\[([^\[\]]+)\]", prompt):
        clean.append(prompt[cursor:match.start()])
        offset = sum(len(c) for c in clean)
        clean.append(match.group(1))
        spans.append((offset, offset + len(match.group(1))))
        cursor = match.end()
    clean.append(prompt[cursor:])
    text = "".join(clean).replace("[", "").replace("]", "")
    groups = [g for start, end in spans if (g := phrase_group(words(text, start, end)))]
    return text, groups


def auto_groups(text: str) -> list[Group]:
    """Adjective-noun heuristic: noun phrases between separators; keep those with at least one attribute."""
    groups, phrase = [], []
    previous_end = 0
    for span in words(text):
        gap = text[previous_end:span.start]
        lower = span.text.lower()
        breaks = any(ch in gap for ch in ",.;:!?()") or lower in SEPARATORS or lower.endswith("ing")
        if breaks or (lower in DETERMINERS and phrase):
            if (group := phrase_group(phrase)) and group.attributes:
                groups.append(group)
            phrase = []
        if not (lower in SEPARATORS or lower.endswith("ing")):
            phrase.append(span)
        previous_end = span.end
    if (group := phrase_group(phrase)) and group.attributes:
        groups.append(group)
    return groups


def find_style(text: str) -> tuple[Span, tuple[int, int]] | None:
    for pattern in STYLE_PATTERNS:
        if match := pattern.search(text):
            style = match.group("style").strip()
            return Span(style, match.start("style"), match.start("style") + len(style)), match.span()
    return None


def parse_prompt(prompt: str, style: str = "") -> ParsedPrompt:
    """Clean text (markers removed, explicit style appended), its groups and its style span."""
    explicit = explicit_groups(prompt)
    text, groups = explicit if explicit is not None else (prompt, [])
    if style.strip():
        text = f"{text.rstrip(' ,.')}, {style.strip()}"
        start = len(text) - len(style.strip())
        found = (Span(style.strip(), start, len(text)), (start, len(text)))
    else:
        found = find_style(text)
    style_span, phrase = found if found else (None, None)
    if explicit is None:
        groups = auto_groups(text[:phrase[0]] if phrase else text)
    return ParsedPrompt(text=text, groups=groups, style=style_span, style_phrase=phrase)


def content_words(parsed: ParsedPrompt) -> list[Span]:
    """Words outside the style phrase that carry content (LPA's NOUN/PROPN/VERB/ADJ, without a tagger)."""
    low, high = parsed.style_phrase or (len(parsed.text), len(parsed.text))
    return [s for s in words(parsed.text) if s.text.lower() not in STOPWORDS and not (low <= s.start < high)]


def token_positions(tokenizer: Any, text: str, start: int, end: int) -> list[int]:
    """Positions (in the encoded, start-token-first sequence) of the tokens of ``text[start:end]``."""
    before = len(tokenizer(text[:start].rstrip(), add_special_tokens=False)["input_ids"]) if start else 0
    upto = len(tokenizer(text[:end], add_special_tokens=False)["input_ids"])
    limit = tokenizer.model_max_length - 1
    return [p for p in range(1 + before, 1 + upto) if p < limit]


def end_positions(tokenizer: Any, text: str) -> list[int]:
    """Positions of the end token and the padding after it: in a causal encoder they have read the whole prompt."""
    end = min(len(tokenizer(text)["input_ids"]) - 1, tokenizer.model_max_length - 1)
    return list(range(end, tokenizer.model_max_length))


def span_positions(tokenizer: Any, text: str, spans: list[Span]) -> list[int]:
    return sorted({p for s in spans for p in token_positions(tokenizer, text, s.start, s.end)})


def find_words(text: str, item: str) -> Span | None:
    """The first whole-word, case-insensitive occurrence of ``item`` in ``text``."""
    match = re.search(rf"(?<![A-Za-z0-9]){re.escape(item.strip())}(?![A-Za-z0-9])", text, re.IGNORECASE)
    return Span(match.group(0), match.start(), match.end()) if match else None


def encode_positive(pipe: Any, text: str, batch: int) -> Any:
    """``text`` encoded alone the way the pipeline encodes its prompt (same layers, both encoders on SDXL)."""
    extra = {"prompt_2": text} if getattr(pipe, "text_encoder_2", None) is not None else {}
    return pipe.encode_prompt(text, device=pipe._execution_device, num_images_per_prompt=batch,
                              do_classifier_free_guidance=False, **extra)[0]
