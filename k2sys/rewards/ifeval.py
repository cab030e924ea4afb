"""IFEval verifiers: the 25 instruction ids of Zhou et al. 2023, strict and loose.

    row {"key", "prompt", "instruction_id_list", "kwargs"} + response
    -> strict: each instruction checked on the response
    -> loose:  an instruction passes when any of 8 variants passes (the response; with '*' removed;
               without its first line, last line, or both; and those with '*' removed)
    -> prompt-level (all instructions of the row) and instruction-level accuracy, strict and loose

Used by the IFEval adapter (k2sys.eval.adapters), the instruction reward's "ifeval" constraints
(k2sys.rewards.instruction) and the instruction task family. Several checks differ from the reward's
own constraint kinds by the benchmark's definitions (bullets count only '*'/'-' lines, paragraphs
are split by '***', keyword search is a case-insensitive regex...), so they are kept apart here.

`language:response_language` uses langdetect when it is installed; without it, a script + stopword
heuristic decides (LANGUAGE_DETECTOR says which), which can disagree with langdetect on short or
mixed-language text.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from typing import Any, Callable


__all__ = ["IFEVAL_CHECKS", "check_instruction", "check_row", "loose_variants", "detect_language",
           "LANGUAGE_DETECTOR", "split_sentences"]

try:
    import langdetect
    LANGUAGE_DETECTOR = "langdetect"
except ImportError:
    langdetect = None
    LANGUAGE_DETECTOR = "heuristic"


def _compare(value: int, relation: str, n: int) -> bool:
    if relation == "less than":
        return value < n
    if relation == "at least":
        return value >= n
    raise ValueError(f"IFEval relation {relation!r}: expected 'less than' or 'at least'")


_ABBREV = re.compile(r"\b(?:Mr|Mrs|Ms|Dr|Prof|Sr|Jr|St|vs|etc|e\.g|i\.e|Inc|Ltd|Co|No|Fig|approx)\.$", re.IGNORECASE)


def split_sentences(text: str) -> list[str]:
    """Sentences ended by . ! ? (runs of them, with closing quotes/brackets) before whitespace or the end;
    abbreviations, initials ('J. R. R.') and decimals do not end one."""
    out, start = [], 0
    for m in re.finditer(r"[.!?]+[\"')\]]*(?=\s|$)", text):
        piece = text[start:m.end()]
        if m.group(0).startswith(".") and (_ABBREV.search(piece) or re.search(r"(?:^|\s)[A-Z]\.$", piece)):
            continue
        if piece.strip():
            out.append(piece.strip())
        start = m.end()
    if text[start:].strip():
        out.append(text[start:].strip())
    return out


def _words(text: str) -> int:
    return len(re.findall(r"\w+", text))


# Stopwords of the Latin-script languages IFEval asks for; non-Latin ones are told apart by script.
_STOPWORDS = {
    "en": "the and is of to in that it you for was with on are this be have not",
    "es": "el la de que y en los del se las por un para con una es no",
    "pt": "o a de que e do da em um para com não uma os no se é",
    "fr": "le la de et les des est un une que en du pas pour dans qui",
    "de": "der die und das ist nicht ein zu den von mit sich des auf für eine",
    "it": "il di che e la per un non è sono una del le con si della",
    "fi": "ja on ei se että hän oli ole mutta kun niin tai myös kuin joka",
    "sw": "na ya wa kwa ni za katika la kuwa hii cha yake ili lakini pia",
    "vi": "và của là có không được trong cho này với những một các người",
}
_SCRIPTS = {  # language -> Unicode name prefix of its script
    "ru": "CYRILLIC", "uk": "CYRILLIC", "bg": "CYRILLIC", "ar": "ARABIC", "fa": "ARABIC", "ur": "ARABIC",
    "hi": "DEVANAGARI", "mr": "DEVANAGARI", "ne": "DEVANAGARI", "bn": "BENGALI", "ta": "TAMIL", "te": "TELUGU",
    "kn": "KANNADA", "gu": "GUJARATI", "pa": "GURMUKHI", "ml": "MALAYALAM", "th": "THAI", "ko": "HANGUL",
    "ja": "HIRAGANA", "zh": "CJK", "el": "GREEK", "he": "HEBREW",
}


def _script_shares(text: str) -> Counter:
    c: Counter = Counter()
    for ch in text:
        if ch.isalpha():
            name = unicodedata.name(ch, "")
            if name.startswith(("HIRAGANA", "KATAKANA")):
                c["HIRAGANA"] += 1
            else:
                c[name.split(" ")[0]] += 1
    return c


def detect_language(text: str) -> str | None:
    """ISO 639-1 code of the text's language (langdetect when installed, else the heuristic)."""
    if langdetect is not None:
        try:
            return langdetect.detect(text)
        except Exception:  # noqa: BLE001 - langdetect raises on text with no features
            return None
    shares = _script_shares(text)
    if not shares:
        return None
    script = shares.most_common(1)[0][0]
    if script == "CJK" and shares["HIRAGANA"]:
        return "ja"
    if script != "LATIN":
        return next((lang for lang, s in _SCRIPTS.items() if s == script), None)
    words = Counter(re.findall(r"\w+", text.lower()))
    scores = {lang: sum(words[w] for w in ws.split()) for lang, ws in _STOPWORDS.items()}
    best = max(scores, key=scores.get)
    return best if scores[best] > 0 else "en"


def _same_language(text: str, want: str) -> bool:
    got = detect_language(text)
    if got is None or got == want:  # undetectable text counts as followed, as in the reference scorer
        return True
    # the heuristic cannot tell languages that share a script and lack a stopword list apart
    return langdetect is None and want in _SCRIPTS and got in _SCRIPTS and _SCRIPTS[got] == _SCRIPTS[want]


def _postscript(r: str, kw: dict) -> bool:
    marker = kw["postscript_marker"].strip()
    if marker == "P.P.S":
        pat = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pat = r"\s*p\.\s?s\..*$"
    else:
        pat = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.findall(pat, r.lower(), flags=re.MULTILINE))


def _highlights(r: str) -> int:
    singles = [h for h in re.findall(r"\*[^\n*]*\*", r) if h.strip("*").strip()]
    doubles = [h for h in re.findall(r"\*\*[^\n*]*\*\*", r) if h.removeprefix("**").removesuffix("**").strip()]
    return len(singles) + len(doubles)


def _sections(r: str, kw: dict) -> int:
    parts = re.split(r"\s?" + re.escape(kw["section_spliter"]) + r"\s?\d+\s?", r)
    return len(parts) - 1


def _paragraphs_stars(r: str, n: int) -> bool:
    parts = re.split(r"\s?\*\*\*\s?", r)
    count = len(parts)
    for i, p in enumerate(parts):
        if not p.strip():
            if i in (0, len(parts) - 1):
                count -= 1
            else:
                return False
    return count == n


def _nth_paragraph(r: str, kw: dict) -> bool:
    parts = re.split(r"\n\n", r)
    count = sum(1 for p in parts if p.strip())
    if count != int(kw["num_paragraphs"]):
        return False
    nth = int(kw["nth_paragraph"])
    if not 1 <= nth <= count:
        return False
    para = parts[nth - 1].strip()
    if not para:
        return False
    word = para.split()[0].strip().lstrip("'\"")
    first = ""
    for ch in word:
        if ch in ".,?!'\"":
            break
        first += ch.lower()
    return first == kw["first_word"].strip().lower()


def _json(r: str) -> bool:
    s = r.strip()
    for pre in ("```json", "```Json", "```JSON", "```"):
        s = s.removeprefix(pre)
    s = s.removesuffix("```").strip()
    try:
        json.loads(s)
    except ValueError:
        return False
    return True


def _two_responses(r: str) -> bool:
    parts = r.split("******")
    valid = []
    for i, p in enumerate(parts):
        if not p.strip():
            if i not in (0, len(parts) - 1):
                return False
        else:
            valid.append(p.strip())
    return len(valid) == 2 and valid[0] != valid[1]


def _bullets(r: str) -> int:
    return len(re.findall(r"^\s*\*[^*].*$", r, re.MULTILINE)) + len(re.findall(r"^\s*-.*$", r, re.MULTILINE))


_Check = Callable[[str, dict], bool]

IFEVAL_CHECKS: dict[str, _Check] = {
    "keywords:existence": lambda r, kw: all(re.search(re.escape(k), r, re.IGNORECASE) for k in kw["keywords"]),
    "keywords:frequency": lambda r, kw: _compare(len(re.findall(re.escape(kw["keyword"]), r, re.IGNORECASE)),
                                                 kw["relation"], int(kw["frequency"])),
    "keywords:forbidden_words": lambda r, kw: not any(re.search(r"\b" + re.escape(w) + r"\b", r, re.IGNORECASE)
                                                      for w in kw["forbidden_words"]),
    "keywords:letter_frequency": lambda r, kw: _compare(Counter(r.lower())[kw["letter"].lower()],
                                                        kw["let_relation"], int(kw["let_frequency"])),
    "language:response_language": lambda r, kw: _same_language(r, kw["language"]),
    "length_constraints:number_sentences": lambda r, kw: _compare(len(split_sentences(r)), kw["relation"],
                                                                  int(kw["num_sentences"])),
    "length_constraints:number_paragraphs": lambda r, kw: _paragraphs_stars(r, int(kw["num_paragraphs"])),
    "length_constraints:number_words": lambda r, kw: _compare(_words(r), kw["relation"], int(kw["num_words"])),
    "length_constraints:nth_paragraph_first_word": _nth_paragraph,
    "detectable_content:number_placeholders": lambda r, kw: len(re.findall(r"\[.*?\]", r))
    >= int(kw["num_placeholders"]),
    "detectable_content:postscript": _postscript,
    "detectable_format:number_bullet_lists": lambda r, kw: _bullets(r) == int(kw["num_bullets"]),
    "detectable_format:constrained_response": lambda r, kw: any(
        o in r.strip() for o in ("My answer is yes.", "My answer is no.", "My answer is maybe.")),
    "detectable_format:number_highlighted_sections": lambda r, kw: _highlights(r) >= int(kw["num_highlights"]),
    "detectable_format:multiple_sections": lambda r, kw: _sections(r, kw) >= int(kw["num_sections"]),
    "detectable_format:json_format": lambda r, kw: _json(r),
    "detectable_format:title": lambda r, kw: any(t.lstrip("<").rstrip(">").strip()
                                                 for t in re.findall(r"<<[^\n]+>>", r)),
    "combination:two_responses": lambda r, kw: _two_responses(r),
    "combination:repeat_prompt": lambda r, kw: r.strip().lower().startswith(kw["prompt_to_repeat"].strip().lower()),
    "startend:end_checker": lambda r, kw: r.strip().strip('"').lower().endswith(kw["end_phrase"].strip().lower()),
    "startend:quotation": lambda r, kw: len(r.strip()) > 1 and r.strip()[0] == '"' and r.strip()[-1] == '"',
    "change_case:capital_word_frequency": lambda r, kw: _compare(
        sum(1 for w in re.findall(r"\w+", r) if w.isupper()), kw["capital_relation"], int(kw["capital_frequency"])),
    "change_case:english_capital": lambda r, kw: r.isupper() and _same_language(r, "en"),
    "change_case:english_lowercase": lambda r, kw: any(c.islower() for c in r)
    and r == r.lower() and _same_language(r, "en"),
    "punctuation:no_comma": lambda r, kw: "," not in r,
}


def check_instruction(instruction_id: str, response: str, kwargs: dict[str, Any] | None) -> bool:
    """Strict check of one instruction (an empty response never follows one)."""
    fn = IFEVAL_CHECKS.get(instruction_id)
    if fn is None:
        raise KeyError(f"IFEval instruction id {instruction_id!r} is not implemented; known: {sorted(IFEVAL_CHECKS)}")
    kw = {k: v for k, v in (kwargs or {}).items() if v is not None}
    if not response.strip():
        return False
    try:
        return bool(fn(response, kw))
    except KeyError as e:
        raise ValueError(f"IFEval instruction {instruction_id!r} needs kwarg {e.args[0]!r}; got {sorted(kw)}") from None


def loose_variants(response: str) -> list[str]:
    lines = response.split("\n")
    first, last, both = "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()
    base = [response, first, last, both]
    return base + [v.replace("*", "") for v in base]


def check_row(instruction_ids: list[str], kwargs_list: list[dict | None], response: str) -> dict[str, list[bool]]:
    """{"strict": [...], "loose": [...]}: one bool per instruction of an IFEval row."""
    if len(kwargs_list) != len(instruction_ids):
        raise ValueError(f"IFEval row: {len(instruction_ids)} instruction ids but {len(kwargs_list)} kwargs entries")
    strict, loose = [], []
    variants = loose_variants(response)
    for iid, kw in zip(instruction_ids, kwargs_list):
        strict.append(check_instruction(iid, response, kw))
        loose.append(any(check_instruction(iid, v, kw) for v in variants))
    return {"strict": strict, "loose": loose}
