"""Final-answer extraction and equivalence for math benchmarks (GSM8K, MATH).

    response -> extract (last \\boxed{...}; GSM8K: last '#### X', then boxed, 'answer is X', last number)
    -> normalise LaTeX (\\dfrac -> \\frac, \\left/\\right, units, degrees, percent, spacing, '\\frac12',
       'a/b', thousands separators, 'x = ' prefixes)
    -> equal when: the normal forms match; or both are numbers (exact rationals); or tuples/intervals
       agree element-wise; or (when sympy is installed) the expressions agree numerically at a few points.

The sympy step never hands model text to sympy directly: a small translator turns the normal form
into an arithmetic string, which must pass a whitelist (digits, operators, parentheses, single-letter
symbols and a few function names) before `parse_expr` (which uses eval) sees it, and is parsed with
evaluate=False and a size cap so a crafted power tower cannot stall the scorer.
"""

from __future__ import annotations

import math
import random
import re
from fractions import Fraction

__all__ = ["last_boxed", "extract_math_answer", "extract_gsm8k_answer", "gsm8k_reference", "normalize_math",
           "parse_number", "math_equal", "numbers_equal", "HAS_SYMPY"]

try:
    import sympy
    from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application, parse_expr,
                                            standard_transformations)
    HAS_SYMPY = True
except ImportError:  # string normalisation and exact numbers only
    HAS_SYMPY = False


# ------------------------------------------------------------------ extraction

def _group_after(text: str, i: int) -> tuple[str, int] | None:
    """(content, end) of the {...} group opening at text[i]; None when unbalanced."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j], j + 1
    return None


_BOX = re.compile(r"\\(?:boxed|fbox)\s*(\{|\s+)")


def last_boxed(text: str) -> str | None:
    """Content of the last balanced \\boxed{...} (or \\fbox{...}, or '\\boxed 5'), else None."""
    found = None
    for m in _BOX.finditer(text):
        if m.group(1) == "{":
            g = _group_after(text, m.end() - 1)
            if g is not None:
                found = g[0]
        else:
            tok = re.match(r"[^\s$]+", text[m.end():])
            if tok:
                found = tok.group(0)
    return found


def extract_math_answer(response: str) -> str | None:
    """MATH convention: the last boxed expression; else what follows the last 'answer is'."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed
    said = re.findall(r"(?i)answer\s+is\s*:?\s*\$?([^\n$]+?)\$?\s*\.?\s*$", response, re.MULTILINE)
    return said[-1].strip() if said else None


_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def gsm8k_reference(answer_field: str) -> str:
    """The gold number of a GSM8K row: what follows '####' in its answer field, commas removed."""
    if "####" not in answer_field:
        raise ValueError(f"GSM8K answer field has no '#### <number>' line: {answer_field[-80:]!r}")
    return answer_field.rsplit("####", 1)[1].strip().replace(",", "")


def extract_gsm8k_answer(response: str) -> str | None:
    """'#### X' (the format GSM8K trains), else \\boxed{X}, else 'answer is X', else the last number."""
    hashes = re.findall(r"####\s*([^\n]+)", response)
    if hashes:
        nums = _NUMBER.findall(hashes[-1])
        return _clean_number(nums[0]) if nums else hashes[-1].strip()
    for cand in (last_boxed(response),
                 (re.findall(r"(?i)answer\s+is\s*:?\s*([^\n]+)", response) or [None])[-1]):
        if cand:
            nums = _NUMBER.findall(cand)
            if nums:
                return _clean_number(nums[0])
    nums = _NUMBER.findall(response)
    return _clean_number(nums[-1]) if nums else None


def _clean_number(s: str) -> str:
    return s.replace("$", "").replace(",", "").replace(" ", "").rstrip(".")


# ------------------------------------------------------------------ normalisation

_TEXT_CMD = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_UNIT_TAIL = re.compile(r"^(.*?[\d})\]])\s*\\(?:text|mbox|mathrm)\s*\{\s*[A-Za-z][A-Za-z .]*\}\s*(?:\^\{?\d\}?)?$")
_WORD_UNITS = ("units", "unit", "degrees", "degree", "cm", "meters", "inches", "feet", "dollars", "cents",
               "square", "sq")


def _fix_sqrt(s: str) -> str:
    return re.sub(r"\\sqrt\s*([0-9a-zA-Z])", r"\\sqrt{\1}", s)


def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{b} -> \\frac{1}{b}, \\frac{a}2 -> \\frac{a}{2}."""
    s = re.sub(r"\\frac\s*([0-9a-zA-Z])\s*([0-9a-zA-Z])", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*([0-9a-zA-Z])\s*\{", r"\\frac{\1}{", s)
    return re.sub(r"\\frac(\{[^{}]*\})([0-9a-zA-Z])", r"\\frac\1{\2}", s)


def normalize_math(text: str) -> str:
    """A canonical string form of a MATH answer (see the module doc); idempotent."""
    s = str(text).strip()
    s = s.replace("\n", "").replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\:", "")
    s = s.replace("\\ ", " ").replace("~", " ").replace("\\displaystyle", "")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\bigl", "").replace("\\bigr", "")
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s).replace("\\circ", "").replace("°", "")
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    m = _UNIT_TAIL.match(s)
    if m:
        s = m.group(1)
    s = _TEXT_CMD.sub(r"\1", s)
    s = re.sub(r"(?<=\d)\s*(?:" + "|".join(_WORD_UNITS) + r")\b\.?$", "", s.strip())
    # 'x = 5' / 'k=5': a short left side names the unknown, the answer is the right side
    if s.count("=") == 1:
        lhs, rhs = s.split("=")
        if len(lhs.strip()) <= 2 and rhs.strip():
            s = rhs
    s = _fix_fracs(_fix_sqrt(s))
    s = s.replace(" ", "")
    s = re.sub(r"(^|[^\d])\.(\d)", r"\g<1>0.\2", s)       # '.5' -> '0.5'
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):      # '1,000' -> '1000'
        s = s.replace(",", "")
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    if m:
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    if re.fullmatch(r"-?\d+\.\d*?0+", s):                  # '2.50' -> '2.5', '3.0' -> '3'
        s = s.rstrip("0").rstrip(".")
    return s.rstrip(".")


# ------------------------------------------------------------------ numbers

def parse_number(text: str) -> Fraction | None:
    """An exact rational from '12', '-3.5', '1,000', '\\frac{3}{4}', '-\\frac34', '3/4', '50\\%'; else None."""
    s = normalize_math(text)
    neg = s.startswith("-")
    body = s[1:] if neg else s
    m = re.fullmatch(r"\\frac\{(\d+)\}\{(\d+)\}", body)
    try:
        if m:
            v = Fraction(int(m.group(1)), int(m.group(2)))
        elif re.fullmatch(r"\d+(\.\d+)?|\.\d+", body):
            v = Fraction(body)
        else:
            return None
    except (ValueError, ZeroDivisionError):
        return None
    return -v if neg else v


def numbers_equal(a: str | None, b: str | None, rel_tol: float = 1e-9) -> bool:
    """Numeric equality of two answers (exact rationals; a relative tolerance absorbs float printing)."""
    if a is None or b is None:
        return False
    x, y = parse_number(a), parse_number(b)
    if x is None or y is None:
        return False
    return x == y or math.isclose(float(x), float(y), rel_tol=rel_tol, abs_tol=0.0)


# ------------------------------------------------------------------ equivalence

_PAIRS = {"(": ")", "[": "]", "\\{": "\\}"}


def _split_top(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def _as_sequence(s: str) -> tuple[str, str, list[str]] | None:
    """('(', ')', elements) for tuples/intervals/sets '(1,2]', '\\{1,2\\}'; ('', '', elements) for '1,2'."""
    for o, c in _PAIRS.items():
        for c2 in (")", "]") if o in "([" else (c,):
            if s.startswith(o) and s.endswith(c2) and len(s) > len(o) + len(c2):
                inner = s[len(o):len(s) - len(c2)]
                depth_ok = _balanced(inner)
                if depth_ok and "," in inner:
                    return o, c2, _split_top(inner)
    if "," in s and _balanced(s):
        parts = _split_top(s)
        if len(parts) > 1:
            return "", "", parts
    return None


def _balanced(s: str) -> bool:
    depth = 0
    for ch in s:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth < 0:
            return False
    return depth == 0


def math_equal(pred: str | None, ref: str | None) -> bool:
    """Whether a predicted answer equals the reference (see the module doc for the steps)."""
    if pred is None or ref is None:
        return False
    a, b = normalize_math(pred), normalize_math(ref)
    if not a or not b:
        return False
    if a == b or numbers_equal(a, b):
        return True
    sa, sb = _as_sequence(a), _as_sequence(b)
    if sa and sb:
        if (sa[0], sa[1]) != (sb[0], sb[1]) or len(sa[2]) != len(sb[2]):
            return False
        if sa[0] == "\\{":  # sets: order does not matter
            rest = list(sb[2])
            for x in sa[2]:
                hit = next((y for y in rest if math_equal(x, y)), None)
                if hit is None:
                    return False
                rest.remove(hit)
            return True
        return all(math_equal(x, y) for x, y in zip(sa[2], sb[2]))
    if sa or sb:
        return False
    return HAS_SYMPY and _sympy_equal(a, b)


_FUNCS = {"sqrt", "pi", "oo", "log", "ln", "sin", "cos", "tan", "sec", "csc", "cot", "exp", "asin", "acos", "atan"}
_SAFE = re.compile(r"^[0-9A-Za-z+\-*/(). ]*$")
_MAX_LEN = 160


def latex_to_expr(s: str) -> str | None:
    """The arithmetic string of a normalised LaTeX answer, or None when it is not plain arithmetic."""
    out, i = "", 0
    while i < len(s):
        if s.startswith("\\frac", i) or s.startswith("\\sqrt", i):
            cmd = s[i + 1:i + 5]
            i += 5
            root = None
            if cmd == "sqrt" and i < len(s) and s[i] == "[":
                j = s.find("]", i)
                if j < 0:
                    return None
                root, i = latex_to_expr(s[i + 1:j]), j + 1
            args = []
            for _ in range(2 if cmd == "frac" else 1):
                if i >= len(s) or s[i] != "{":
                    return None
                g = _group_after(s, i)
                if g is None:
                    return None
                sub = latex_to_expr(g[0])
                if sub is None:
                    return None
                args.append(sub)
                i = g[1]
            if cmd == "frac":
                out += f"(({args[0]})/({args[1]}))"
            elif root is not None:
                out += f"(({args[0]})**(1/({root})))"
            else:
                out += f"sqrt({args[0]})"
            continue
        m = re.match(r"\\([A-Za-z]+)", s[i:])
        if m:
            name = m.group(1)
            rep = {"pi": "pi", "infty": "oo", "cdot": "*", "times": "*", "div": "/", "ln": "log", "log": "log",
                   "sin": "sin", "cos": "cos", "tan": "tan", "sec": "sec", "csc": "csc", "cot": "cot",
                   "exp": "exp"}.get(name)
            if rep is None:
                return None
            out += f" {rep} " if rep.isalpha() else rep
            i += m.end()
            continue
        ch = s[i]
        if ch == "^":
            if i + 1 < len(s) and s[i + 1] == "{":
                g = _group_after(s, i + 1)
                sub = latex_to_expr(g[0]) if g else None
                if sub is None:
                    return None
                out += f"**({sub})"
                i = g[1]
            else:
                out += "**"
                i += 1
            continue
        out += {"{": "(", "}": ")", "[": "(", "]": ")"}.get(ch, ch)
        i += 1
    return out


def _safe_expr(expr: str | None) -> bool:
    if expr is None or len(expr) > _MAX_LEN or not _SAFE.match(expr) or expr.count("**") > 2:
        return False
    if re.search(r"\.[A-Za-z]", expr):  # no attribute access
        return False
    return all(len(w) == 1 or w in _FUNCS for w in re.findall(r"[A-Za-z]+", expr))


def _to_sympy(s: str):
    expr = latex_to_expr(s)
    if not _safe_expr(expr):
        return None
    symbols = {c: sympy.Symbol(c) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"}
    names = {"sqrt": sympy.sqrt, "pi": sympy.pi, "oo": sympy.oo, "log": sympy.log, "ln": sympy.log,
             "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "sec": sympy.sec, "csc": sympy.csc,
             "cot": sympy.cot, "exp": sympy.exp, "asin": sympy.asin, "acos": sympy.acos, "atan": sympy.atan}
    try:
        return parse_expr(expr, local_dict={**symbols, **names}, evaluate=False,
                          transformations=standard_transformations + (implicit_multiplication_application,
                                                                      convert_xor))
    except Exception:  # noqa: BLE001 - any parse failure means "not comparable this way"
        return None


def _sympy_equal(a: str, b: str, points: int = 3) -> bool:
    ea, eb = _to_sympy(a), _to_sympy(b)
    if ea is None or eb is None:
        return False
    syms = sorted((ea.free_symbols | eb.free_symbols), key=lambda x: x.name)
    rng = random.Random(0)
    try:
        for _ in range(points if syms else 1):
            subs = {x: sympy.Float(rng.uniform(0.5, 2.5)) for x in syms}
            va = complex(ea.evalf(30, subs=subs))
            vb = complex(eb.evalf(30, subs=subs))
            if not (math.isfinite(abs(va)) and math.isfinite(abs(vb))):
                return False
            if abs(va - vb) > 1e-8 * max(1.0, abs(va), abs(vb)):
                return False
        return True
    except (TypeError, ValueError, ZeroDivisionError, OverflowError, AttributeError):
        return False
