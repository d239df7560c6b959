"""Answer graders and benchmark evaluation (spec §1 reward, §6 evaluation).

    extract_answer(text)            content of the last \\boxed{...} / \\fbox{...} (braces matched), or None
    grade(pred, gold) -> bool       is the extracted answer equivalent to the gold answer?
    reward(text, gold) -> float     1.0 / 0.0 = grade(extract_answer(text), gold)   (the RL reward, spec §1)
    evaluate(model, tok, examples)  batched generation + grading -> (accuracy, records)
    run_benchmarks(...)             pass@1 per benchmark + macro average, every prediction to a JSONL file

    python eval.py --model DIR --benchmarks aime,amc,math500,minerva,olympiad [--skip-ratio 0.1 --skip-border 1]
        DIR: a checkpoint folder (config.json + safetensors + tokenizer), e.g. a training run's RUN/checkpoint or
        RUN/sft. Datasets: --data, else $NESTED_REFT_DATA, else shared/data beside the project folder.
        Predictions: --out, else runs/eval-<DIR's name>-<time>.jsonl, the run's name in front for RUN/checkpoint
        and RUN/sft (runs/eval-RUN-checkpoint-<time>.jsonl).

How grade() decides (each rule is documented where it is implemented):
  1. pred None -> False; a list gold matches if any element does; int/float golds compare as numbers.
  2. Both sides are normalised (Hendrycks-style: \\text{}, units, \\left/\\right, \\dfrac, \\frac12, spaces,
     degrees, %, $, thousands separators, x= prefixes, ...). Equal strings -> True (the fast path).
  3. Structure: matrices cell by cell; tuples/points/intervals in order with the same brackets; sets
     \\{..\\}, unions and bare comma lists as unordered multisets ("a \\pm b" is the list a+b, a-b). A gold
     with thousands separators (10,000) is only a number, never a list ("10, 0" and "0,10" are wrong for it),
     unless its text writes the commas as list separators: a space after one ("81, 256") or degree marks
     ("60^\\circ, 120^\\circ"); then it is only a list (256, 81 is right for it, 81256 is wrong). A prediction
     "1,000" is tried as a number and as a list; "1, 000", "0,166" and "1 \\text{ or } 166" only as lists.
  4. Scalars: a gold that is a plain word of 3+ letters ("Evelyn", "\\text{yes}", "\\text{CBAD}") is matched only by
     that word, case-insensitively ("Evenly" != "Evelyn"; no product of its letters: "A \\cdot B \\cdot C \\cdot D"
     != "CBAD"), and a 2-letter word gold not by a longer word; two 2-letter words may be a product ("yx" ==
     "xy"). Otherwise a small hand-written recursive-descent parser (numbers, + - * / ^, \\frac, \\sqrt, \\pi, e,
     i, functions, single-letter variables, also \\dot x / \\ddot x) turns both sides into expression trees.
     Never eval/exec; no sympy. f, g, h, u or an uppercase letter directly followed by "(" is a function call
     (I(0), f(4-x)): such an answer is not comparable, only its normalised text counts (x(x+1), 2a(b+c), n(n+1)/2
     stay products).
     Constants (no variables) are compared by these rules, in order ("exact" text: no decimal literal
     anywhere, or an integer literal with zero decimals such as 142.0):
       a. A gold written as a decimal literal g with d decimals (408.04, -0.5, also 4.5e33 / 2.88 \\times 10^{16}
          with d decimals in the mantissa and exponent k); h = 0.5 * 10^(k-d), half a unit of its last digit.
          The prediction is right when (i) it equals g up to relative 1e-12 (the noise of golds that are printed
          floats: 2/3 is right for SVAMP's 0.6666666666666666), or, for a gold with 2+ significant digits, when
          it rounds to g (half away from zero: the same sign and |pred| in [|g| - h, |g| + h)) and (ii) it is a
          decimal literal with a finer last digit than g (1.602 and 1.55 for 1.6, not 1.55 for 1.5; 54.5454 for
          54.545) or (iii) it is exact text and g has 3+ significant digits (\\pi for 3.14, \\frac{600}{11} for
          54.545; not \\frac13 for 0.33, 2\\sqrt5 for 4.5). A decimal with as many or fewer digits than g must
          equal it (408 and 408.0 are wrong for 408.04, 54.55 for 54.545); a gold with one significant digit
          (0.5, 0.01, 0.3) is exact (0.499, 0.006 and \\frac13 are wrong for them).
       b. Otherwise exact comparison; an integer-valued exact gold (204, 2^{100}-2, 1,000) and any prediction that
          is no decimal literal (0.2+0.6i) get no slack. Rational values (integers, + - * /, integer powers,
          mixed numbers, percents, n!, binomials, floor/ceil/|.| of rationals) are evaluated exactly with int /
          fractions.Fraction, so 2^{100}-3 != 2^{100}-2 and 204.01 != 204; irrational ones (\\pi, roots, e, i,
          logs, trig) in complex floating point (12349\\pi != 12348\\pi).
       c. A prediction written as a decimal literal with 3+ significant digits against an exact non-integer gold:
          it must be the gold rounded half away from zero or truncated at the prediction's last digit (0.3333
          for \\frac13, 0.6666 and 0.6667 for \\frac23, 1.4142 for \\sqrt2, 0.866 for \\frac{\\sqrt3}{2}, 3.14 for
          \\pi; not 142.87 for \\frac{1000}{7}, 0.3334 for \\frac13, nor 0.33 or 3.1 with two digits).
       d. A gold with decimals inside an expression (2.5\\pi): relative 1e-4.
     Floating-point comparisons also allow round-off: relative 1e-9 of the larger value, and an absolute 1e-12
     only where the gold's value is exactly 0 (\\sin\\pi == 0, but 0 != \\sqrt2 \\times 10^{-13}).
     A known limit: a prediction with a root or a function in it goes to floating point even against an integer
     gold, so beyond ~10^9 it can be off by one (2^{100}-\\sqrt{9} == 2^{100}-2, 12345678900+\\sqrt{1} ==
     12345678900).
     Expressions with variables are evaluated in complex floats at fixed pseudo-random points and must agree to
     relative 1e-8 at every point (absolute 1e-12 only where the gold's value there is exactly 0): 6 positive
     non-integer points in [0.3, 7.5) (a point where both sides are undefined is skipped, one where only one
     side is fails, at least 3 must compare); when a tree holds |.|, floor or ceil, also 4 points with negative
     coordinates and 4 with small integer ones, skipping those where a side is undefined or not real (so
     x != |x|, 3-x != |x-3|, \\lfloor n/2 \\rfloor + 1 != \\lceil n/2 \\rceil). Equivalences that hold only on
     integers (\\lceil n/2 \\rceil = \\lfloor (n+1)/2 \\rfloor) are not recognised.
     A constant gold wants a constant: a prediction with variables is right only when they cancel, i.e. it
     agrees with the gold to round-off (relative 1e-9) at every point and exactly where its value there is
     rational (\\sin^2x+\\cos^2x == 1, (x+1)^2-x^2-2x-1 == 0; 1000001+0x != 1000000, 0x != 8.224 \\times 10^{-19}),
     and not by a constant factor 0: "0 \\text{ (or } 7\\text{)}" reads 0·o·r·7, a hedge, wrong for 0 (so is 0x),
     as "x + 0 \\text{ (or } 7\\text{)}" is for x and an equation "... = 0 \\text{ (or } 7\\text{)}" for "... = 0".
     Equations: "x = 5" against "5" compares 5 (a variable, subscripted variable or function call on the left
     is dropped, and so is a segment or angle name before a constant: "AB = 12+12\\sqrt{3}"); the same left side
     on both sides compares the right sides; else L1 - R1 == ±(L2 - R2). A gold equation of two constants
     ("0.56 = 56\\%", "\\frac23 \\approx 0.67") is matched by a prediction equal to either side, or by an
     equation whose sides each are ("56\\% = 0.56"; not "1 = 56.44", which has the same L - R).
     Roots: \\sqrt{a} is the principal square root (\\sqrt{-4} = 2i); an odd root of a negative real is the
     real root (\\sqrt[3]{-8} = -2); a^{1/3} written as a power is the principal (complex) one.
     Percent decision: the % sign is dropped, so "10\\%" == "10"; when exactly one side wrote %, that side's
     value / 100 is accepted too, so "50\\%" == "0.5" (and "50\\%" == "50").
     An empty gold (after normalisation) matches nothing: a broken record never rewards.
  5. Bounded time on any input: answers longer than MAX_ANSWER_CHARS are compared as stripped strings only,
     the parser stops at MAX_TOKENS tokens / MAX_DEPTH nesting, exponents above MAX_EXPONENT in magnitude in
     floating point, factorials above 170, non-finite values and a tree too deep for Python's recursion (a chain
     of 400 implicit factors "xx...x") make an expression "not comparable" (-> not equal; grade() never raises on
     a prediction); exact arithmetic takes any integer exponent whose result stays within _EXACT_BITS bits (so
     2 \\cdot 2^{1008} == 2^{1009}) and hands over to floating point as soon as any intermediate value exceeds them.
"""
from __future__ import annotations

import argparse
import cmath
import json
import math
import numbers
import operator
import os
import re
import sys
import time
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

MAX_ANSWER_CHARS = 1000   # longer answers: exact (stripped) string comparison only
MAX_TOKENS = 400          # parser input limit (tokens)
MAX_DEPTH = 40            # parser nesting limit
MAX_EXPONENT = 1000       # |b| limit in a^b
MAX_LIST = 64             # more elements than this in a list/tuple/set/matrix: string comparison only

# ======================================================================================================
# Extraction
# ======================================================================================================

_BRACE_RE = re.compile(r"\\.|[{}]", re.S)   # an escaped char (\{ \} \\) or a brace


def extract_answer(text: str | None, fallback: bool = False) -> str | None:
    """The content of the last \\boxed{...} or \\fbox{...} of `text`, nested braces matched (escaped \\{ \\}
    do not count), stripped; longer commands (\\fboxsep) are no box. Also the brace-less form "\\boxed 5"
    (content up to the next $ or line end).
    An unbalanced last box (e.g. a truncated completion) gives None. Linear time in len(text).

    fallback=True (documented option, GSM8K style, for models that do not box their answer): when there is
    no usable box, the text after the last "####" or "answer is" on its line (its leading number when it
    starts with one), else the last number of the text (thousands commas removed), else None.
    """
    if text is None:
        return None
    end = _last_box_end(text)
    ans = _box_content(text, end) if end >= 0 else None
    if ans is None and fallback:
        ans = _fallback_answer(text)
    return ans


_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")   # \boxed / \fbox, not a longer command (\fboxsep)


def _last_box_end(text: str) -> int:
    """Index just after the last \\boxed or \\fbox command, or -1 (one linear scan)."""
    end = -1
    for m in _BOX_RE.finditer(text):
        end = m.end()
    return end


def _box_content(text: str, i: int) -> str | None:
    """The argument of the box command that ends just before text[i]: {...} (braces matched; None when they do not
    balance) or the brace-less form; None when there is neither."""
    j = i
    while j < len(text) and text[j] in " \t":
        j += 1
    if j < len(text) and text[j] == "{":
        depth = 0
        for m in _BRACE_RE.finditer(text, j):       # visits only braces and escapes: linear
            c = m.group()
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[j + 1:m.start()].strip()
        return None                                  # unbalanced
    if j > i:                                        # "\boxed 5$" form
        end = len(text)
        for stop in ("$", "\n"):
            k = text.find(stop, j)
            if k >= 0:
                end = min(end, k)
        ans = text[j:end].strip().rstrip(".").strip()
        return ans or None
    return None


_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_LEADING_NUMBER_RE = re.compile(r"[\s$:*]*(-?\d[\d,]*(?:\.\d+)?)(?![\d/^]|\.\d)")
_WORD_AFTER_RE = re.compile(r"[A-Za-z]{2,}|[.,;!]|$")      # "72 apples." / "72." / "72": the number is the answer


def _fallback_answer(text: str) -> str | None:
    low = text.lower()
    for key in ("####", "answer is"):
        k = low.rfind(key)
        if k >= 0:
            seg = text[k + len(key):].split("\n", 1)[0]
            m = _LEADING_NUMBER_RE.match(seg)
            if m and _WORD_AFTER_RE.match(seg[m.end():].strip(" $*")):
                return m.group(1).replace(",", "")
            seg = seg.strip(" \t:*$").rstrip(".").strip(" $")
            if seg:
                return seg
    nums = _NUMBER_RE.findall(text)
    return nums[-1].replace(",", "").rstrip(",") if nums else None


# ======================================================================================================
# Normalisation (Hendrycks et al. 2021 style, extended)
# ======================================================================================================

_UNICODE = [("\u2212", "-"), ("\u2013", "-"), ("\u221e", "\\infty"), ("\u03c0", "\\pi"), ("\u221a", "\\sqrt"),
            ("\u00d7", "\\times"), ("\u22c5", "\\cdot"), ("\u00b7", "\\cdot"), ("\u00b0", "^\\circ"),
            ("\u2264", "\\leq"), ("\u2265", "\\geq"), ("\u00b1", "\\pm"), ("\u211d", "\\mathbb{R}")]
# command aliases, applied as whole command names
_ALIASES = {"dfrac": "\\frac", "tfrac": "\\frac", "cfrac": "\\frac", "dbinom": "\\binom", "tbinom": "\\binom",
            "ge": "\\geq", "geqslant": "\\geq", "le": "\\leq", "leqslant": "\\leq", "ne": "\\neq",
            "lbrace": "\\{", "rbrace": "\\}", "varnothing": "\\emptyset", "vert": "|", "lvert": "|",
            "rvert": "|", "varepsilon": "\\epsilon", "infin": "\\infty"}
_ALIAS_RE = re.compile(r"\\(" + "|".join(sorted(_ALIASES, key=len, reverse=True)) + r")(?![a-zA-Z])")
_DROP_RE = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|big|Big|bigg|Bigg|displaystyle|"
                      r"textstyle|limits|nolimits)(?![a-zA-Z])\.?")
_SPACE_CMD_RE = re.compile(r"\\[!,;:>]|(?<!\\)\\ |\\q?quad(?![a-zA-Z])|~")
_WRAP_RE = re.compile(r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|mathsf|mbox|"
                      r"operatorname|boldsymbol|bm|hbox)\s*\{([^{}]*)\}")
# a trailing unit: \text{ cm}, \mbox{ inches}^2, \mathrm{m/s}^{-1}, after something else
_UNIT_GROUP_RE = re.compile(r"\\(?:text|mbox|mathrm|textrm)\s*\{\s*[A-Za-z][A-Za-z./ ]*\}"
                            r"(?:\^\{?-?\d+\}?)?\s*$")
_UNIT_WORDS = ("units", "unit", "sq", "square", "cubic", "cm", "mm", "km", "m", "meters", "meter", "metres",
               "centimeters", "centimeter", "inches", "inch", "feet", "foot", "ft", "yards", "yard", "miles",
               "mile", "mph", "degrees", "degree", "dollars", "dollar", "cents", "cent", "hours", "hour", "hrs",
               "minutes", "minute", "min", "seconds", "second", "sec", "days", "day", "weeks", "week", "years",
               "year", "kg", "grams", "gram", "g", "pounds", "pound", "lbs", "ounces", "oz", "liters", "liter",
               "ml", "gallons", "gallon", "cups", "people", "students", "percent", "Hz")
# bare unit words at the end, after a digit / } / ) and at least one space: "17 meters", "5 sq ft"
_UNIT_WORD_RE = re.compile(r"(?<=[\d}).])(?:\s+(?:" + "|".join(_UNIT_WORDS) + r")\.?)+(?:\^\d)?\s*$")
_DEGREE_RE = re.compile(r"(?:\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree)(?:\s*[CF](?![a-zA-Z]))?")
_REALS_RE = re.compile(r"\\mathbb\s*(?:\{\s*R\s*\}|R(?![a-zA-Z]))")   # the real line: \mathbb{R} -> (-\infty,\infty)
_PRIME_RE = re.compile(r"\^\s*\{?\s*((?:\\prime\s*)+)\}?")                  # x^{\prime} -> x'
_ARCSEC_RE = re.compile(r"(?<=\d)(?:'+|\^\s*\{?\s*(?:\\prime\s*)+\}?)\s*$")  # 0.003^{\prime\prime} -> 0.003

_FRAC_BOTH_RE = re.compile(r"\\frac\s*([0-9a-zA-Z])\s*([0-9a-zA-Z])")       # \frac12 -> \frac{1}{2}
_FRAC_NUM_RE = re.compile(r"\\frac\s*([0-9a-zA-Z])\s*(?=\{)")                # \frac1{2}
_FRAC_DEN_RE = re.compile(r"\\frac\s*(\{[^{}]*\})\s*([0-9a-zA-Z])")          # \frac{270}7
_SQRT_RE = re.compile(r"\\sqrt\s*([0-9a-zA-Z])")                              # \sqrt2 -> \sqrt{2}
_MIXED_RE = re.compile(r"(?<![\w.}^_{\\])(\d+)\s*\\frac\{(\d+)\}\{(\d+)\}")  # 137 \frac{1}{2} -> (137+..)
_LEADING_DOT_RE = re.compile(r"(?<!\d)\.(?=\d)")                              # .5 -> 0.5
_SPACES_RE = re.compile(r"(\\[a-zA-Z]+)?\s+(?=(.?))", re.S)
_BRACED_SCRIPT_RE = re.compile(r"([_^])\{(\w)\}(?![\d.])")                     # x^{2} -> x^2; not x^{2}3 (x^23)
_IN_PREFIX_RE = re.compile(r"^[a-zA-Z]\\in(?![a-zA-Z])")                    # x \in [1,2] -> [1,2]
_VAR = r"(?:[a-zA-Z]|\\[a-zA-Z]+)"
_TUPLE_LHS_RE = re.compile(r"^\(" + _VAR + r"(?:," + _VAR + r")+\)=(?=[(\[])")  # (x,y)=(1,2) -> (1,2)
_CHOICE_RE = re.compile(r"^\(([A-E])\)$")                                    # (C) -> C
_AND_RE = re.compile(r"(?:\s*,)?\s+(?:and|or)\s+")                      # with a serial comma: "2, 3, and 4"
_PLUS_INFTY_RE = re.compile(r"(?<=[(\[{,])\+(?=\\infty(?![a-zA-Z]))")   # (2,+\infty) -> (2,\infty)


@lru_cache(maxsize=1 << 14)
def normalize(s: str) -> str:
    """Canonical string form of an answer. Rules, in order:

    - unicode math symbols -> LaTeX (− ∞ π √ × · ° ≤ ≥ ± ℝ); newlines -> spaces
    - explicit thousands separators removed: "10,\\!080", "24{,}000" -> 10080, 24000
    - math delimiters $ \\( \\) \\[ \\] and the dollar sign \\$ removed
    - \\left \\right \\big... \\displaystyle removed (with \\left. / \\right.);
      spacing \\! \\, \\; \\: \\quad ~ -> space
    - command aliases: \\dfrac \\tfrac \\cfrac -> \\frac, \\dbinom -> \\binom, \\ge \\geqslant -> \\geq, ...;
      the real line \\mathbb{R} -> (-\\infty,\\infty)
    - units: trailing \\text{ cm} / \\mbox{ inches}^2 groups and bare unit words ("17 meters") after a value
      are dropped; then \\text{X} \\mathrm{X} \\mbox{X} \\textbf{X} ... are unwrapped to X ("\\text{(C)}" -> "(C)")
    - degrees: ^\\circ, ^{\\circ}, \\circ, \\degree removed (with a following C/F: "1950^\\circ C" -> 1950); a
      trailing arc-minute/second mark after a number removed (0.003^{\\prime\\prime} -> 0.003); other
      ^{\\prime} -> ' (derivatives); percent signs \\% and % removed (see grade())
    - " and " / " or " between answers, also after a comma, -> "," ("x=2 \\text{ or } x=3" is the list x=2, x=3;
      "2, 3, \\text{ and } 4" is 2, 3, 4)
    - \\frac12, \\frac1{2}, \\frac{270}7 -> \\frac{1}{2}, ...; \\sqrt2 -> \\sqrt{2}; mixed numbers
      "137 \\frac{1}{2}" -> "(137+\\frac{1}{2})"; a leading-dot decimal .5 -> 0.5
    - all whitespace removed, except one space between a command and a following letter ("\\cot x")
    - single-character scripts unbraced: x^{2} -> x^2, 4210_{5} -> 4210_5; not before a digit or ".", where the
      braces end the script (x^{2}3 is 3x^2, not x^23)
    - "x \\in" prefix and a tuple of variables on the left of a tuple removed ("(x, y) = (1, 2)" -> "(1,2)",
      "(r, \\theta) = (3, \\pi)"); \\approx read as "=" (a leading one dropped); trailing "." and "," removed;
      a choice "(C)" -> "C"; "\\{\\}" -> \\emptyset; a "+" before \\infty dropped, leading or after ( [ { ,
      ("(2,+\\infty)" -> "(2,\\infty)": the parser never sees \\infty, so only the text compares)
    """
    s = str(s)
    for a, b in _UNICODE:
        s = s.replace(a, b)
    s = s.replace("\n", " ").replace("\r", " ").replace("\t", " ").strip()
    s = s.replace("{,}", "")
    s = re.sub(r",\\!\s*(?=\d)", "", s)
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "")
    s = _DROP_RE.sub("", s)
    s = _SPACE_CMD_RE.sub(" ", s)
    s = _ALIAS_RE.sub(lambda m: _ALIASES[m.group(1)], s)
    s = _REALS_RE.sub(r"(-\\infty,\\infty)", s)
    s = _DEGREE_RE.sub("", s)
    s = _ARCSEC_RE.sub("", s)
    s = _PRIME_RE.sub(lambda m: "'" * m.group(1).count("prime"), s)
    s = s.replace("\\%", "").replace("%", "").strip()
    s = _strip_units(s)
    for _ in range(4):                               # unwrap nested \text{\textbf{..}} a few levels deep
        t = _WRAP_RE.sub(r"\1", s)
        if t == s:
            break
        s = t
    s = _strip_units(s).strip()
    s = _AND_RE.sub(",", s)
    s = _FRAC_BOTH_RE.sub(r"\\frac{\1}{\2}", s)
    s = _FRAC_NUM_RE.sub(r"\\frac{\1}", s)
    s = _FRAC_DEN_RE.sub(r"\\frac\1{\2}", s)
    s = _SQRT_RE.sub(r"\\sqrt{\1}", s)
    s = _MIXED_RE.sub(r"(\1+\\frac{\2}{\3})", s)
    s = _LEADING_DOT_RE.sub("0.", s)
    s = _SPACES_RE.sub(lambda m: (m.group(1) + " ") if m.group(1) and m.group(2).isalpha()
                       else (m.group(1) or ""), s)
    s = _BRACED_SCRIPT_RE.sub(r"\1\2", s)
    s = _PLUS_INFTY_RE.sub("", s)
    s = _IN_PREFIX_RE.sub("", s)
    s = _TUPLE_LHS_RE.sub("", s)
    s = s.replace("\\approx", "=").lstrip("=")      # "x \approx 1.6" -> "x=1.6";  "\approx 1.6" -> "1.6"
    while len(s) > 1 and s[0] == "{" and s[-1] == "}" and _spans(s):   # {5} -> 5
        s = s[1:-1]
    s = s.rstrip(".,").strip()                       # a trailing "." or "," (the Math12k gold "\\text{(E)},")
    s = _CHOICE_RE.sub(r"\1", s)
    if s == "\\{\\}":                               # the empty set written as braces
        s = "\\emptyset"
    if s.startswith("+") and len(s) > 1:
        s = s[1:]
    return s


def _strip_units(s: str) -> str:
    """Drop trailing unit groups / unit words that follow a value (never the whole answer)."""
    for _ in range(4):
        m = _UNIT_GROUP_RE.search(s) or _UNIT_WORD_RE.search(s)
        if not m or not s[:m.start()].strip():
            break
        s = s[:m.start()].rstrip()
    return s


# ======================================================================================================
# Structure: lists, sets, tuples, intervals, matrices
# ======================================================================================================

_OPEN, _CLOSE = "([{", ")]}"
_MATRIX_RE = re.compile(r"^\\begin\{([pbBvV]?matrix|array)\}(?:\{[lcr|]*\})?(.*)\\end\{\1\}$", re.S)


def _split_top(s: str, sep: str) -> list[str]:
    """Split at occurrences of `sep` outside any (), [], {} (brackets counted generically, so "[1,2)" works)."""
    parts, depth, last, i, n = [], 0, 0, 0, len(s)
    while i < n:
        c = s[i]
        if c == "\\" and i + 1 < n and s[i + 1] in "{}":   # \{ \} count as brackets too
            depth += 1 if s[i + 1] == "{" else -1
            i += 2
            continue
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[last:i])
            i += len(sep)
            last = i
            continue
        i += 1
    parts.append(s[last:])
    return parts


def _spans(s: str) -> bool:
    """Does the bracket opening at s[0] close exactly at the end of s? (\\{ \\} count as brackets.)"""
    depth, i, n = 0, 0, len(s)
    while i < n:
        c, w = s[i], 1
        if c == "\\" and i + 1 < n and s[i + 1] in "{}":
            c, w = s[i + 1], 2
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
            if depth == 0:
                return i + w == n
        i += w
    return False


def _expand_pm(items: list[str]) -> list[str]:
    """'a \\pm b' (one \\pm or \\mp) stands for the two answers a+b and a-b."""
    out = []
    for x in items:
        k = x.count("\\pm") + x.count("\\mp")
        if k == 1:
            out += [x.replace("\\pm", "+").replace("\\mp", "+"), x.replace("\\pm", "-").replace("\\mp", "-")]
        else:
            out.append(x)
    return out


def _structure(s: str):
    """('matrix', rows) | ('tuple', open, close, items) | ('set', items) | ('scalar', s).

    sets: \\{a,b\\}, unions A \\cup B, bare comma lists "1,-2" and a \\pm b are unordered;
    tuples/points/intervals "(1,2)", "[a,b)" keep their order and their brackets."""
    m = _MATRIX_RE.match(s)
    if m:
        rows = [r for r in m.group(2).split("\\\\") if r.strip() != ""]
        return ("matrix", [[c.strip() for c in r.split("&")] for r in rows])
    if s.startswith("\\{") and s.endswith("\\}") and _spans(s):
        inner = s[2:-2]
        return ("set", _expand_pm([x for x in _split_top(inner, ",") if x] if inner else []))
    for sep in ("\\cup", ","):
        parts = _split_top(s, sep)
        if len(parts) > 1:
            return ("set", _expand_pm(parts))
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _spans(s):
        items = _split_top(s[1:-1], ",")
        if len(items) > 1:
            return ("tuple", s[0], s[-1], items)
    if s.count("\\pm") + s.count("\\mp") == 1:
        return ("set", _expand_pm([s]))
    return ("scalar", s)


class _Budget:
    """Caps the number of pairwise comparisons of one grade() call (lists of lists cost len^2 each level)."""

    def __init__(self, left: int = 4000):
        self.left = left

    def spend(self):
        self.left -= 1
        if self.left < 0:
            raise _NotComparable("comparison budget exhausted")


def _equiv(p: str, g: str, budget: _Budget, depth: int = 0) -> bool:
    """Equivalence of two normalised answers (structure first, then scalars)."""
    if p == g:
        return True
    budget.spend()
    if depth > 6:
        return False
    sp, sg = _structure(p), _structure(g)
    kp, kg = sp[0], sg[0]
    if kp == "matrix" or kg == "matrix":
        if kp != kg or len(sp[1]) != len(sg[1]) or any(len(a) != len(b) for a, b in zip(sp[1], sg[1])):
            return False
        cells = [(a, b) for ra, rb in zip(sp[1], sg[1]) for a, b in zip(ra, rb)]
        return len(cells) <= MAX_LIST and all(_equiv(a, b, budget, depth + 1) for a, b in cells)
    if kp == "set" or kg == "set":                   # a lone answer is a one-element set: \{(1,2)\} == (1,2)
        ip = sp[1] if kp == "set" else [p]
        ig = sg[1] if kg == "set" else [g]
        return _match_unordered(ip, ig, budget, depth)
    if kp == "tuple" or kg == "tuple":
        if kp != kg or sp[1:3] != sg[1:3] or len(sp[3]) != len(sg[3]) or len(sp[3]) > MAX_LIST:
            return False
        return all(_equiv(a, b, budget, depth + 1) for a, b in zip(sp[3], sg[3]))
    return _scalar_equiv(p, g)


def _match_unordered(ps: list[str], gs: list[str], budget: _Budget, depth: int) -> bool:
    """Multiset equality under _equiv (greedy matching; exact for any equivalence relation)."""
    if len(ps) != len(gs) or len(ps) > MAX_LIST:
        return False
    left = list(gs)
    for a in ps:
        for j, b in enumerate(left):
            if _equiv(a, b, budget, depth + 1):
                del left[j]
                break
        else:
            return False
    return True


# ======================================================================================================
# Scalars: equations, words, and the expression parser
# ======================================================================================================

_LHS_RE = re.compile(r"^(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\w|_\{[^{}]*\})?(?:\([a-zA-Z0-9,]*\))?'*$")
_SEGMENT_RE = re.compile(r"^[A-Z]{2,3}$")          # a segment or angle named by its points: AB, ABC
_WORD_RE = re.compile(r"^[A-Za-z]{2,}$")


def _scalar_equiv(p: str, g: str, p_scale: Fraction = Fraction(1), g_scale: Fraction = Fraction(1)) -> bool:
    """Equivalence of two single answers.

    - words ("Evelyn", "yes"): a gold that is a plain word of 3+ letters (after the equation rules below), or a
      2-letter one against a 3+-letter word, is matched only by that word, case-insensitively ("Evenly" !=
      "Evelyn", "E \\cdot velyn" != "Evelyn": no product of variables, which would match every anagram);
      two 2-letter words may be products ("yx" == "xy", a Math12k gold), so "on" == "no" (a known limit)
    - equations "L = R" on both sides: the same function/variable on the left ("f(x) = x+1" vs "f(x)=1+x") compares
      the right sides; otherwise equal when L1 - R1 == ±(L2 - R2) as expressions (so "x = 5" == "5 = x")
    - an equation on one side only whose left side is a variable, a subscripted variable or a function call
      ("x = 5", "k=3", "f(n) = 2n+1", "m_{\\max} = 7"), or a segment / angle name before a constant
      ("AB = 12+12\\sqrt{3}"), is replaced by its right side
    - a gold equation of two constants ("0.56 = 56\\%", "\\$\\dfrac23 \\approx \\$0.67", Math12k golds): a prediction
      equal to either side is right, and an equation whose sides each are ("56\\% = 0.56", "x = 0.56"); not
      L1 - R1 == ±(L2 - R2), which "1 = 56.44" meets
    - otherwise numeric/symbolic comparison of the parsed expressions (tolerances: module docstring); a constant
      gold wants a constant: a prediction's variables must cancel (_cancels_to: "1000001+0x" != "1000000")
    """
    if p == g and p_scale == g_scale:
        return True
    pe, ge = _split_top(p, "="), _split_top(g, "=")
    if len(ge) == 2 and len(pe) <= 2 and _is_constant(ge[0]) and _is_constant(ge[1]):
        # a gold giving one value two ways ("0.56 = 56\\%", "\\frac23 \\approx 0.67"): either side is right, and so is a
        # prediction equation whose sides (the right one after "x =") each are ("56\\% = 0.56"), not one with the
        # same difference ("1 = 56.44"); not with the gold's % factor (the percent retry), which belongs to one side
        if len(pe) == 2 and _names_answer(pe):
            pe = pe[1:]
        return g_scale == 1 and all(any(_scalar_equiv(x, side, p_scale) for side in ge) for x in pe)
    if len(pe) == len(ge) == 2 and pe[0] == ge[0] and _LHS_RE.match(pe[0]):
        p, g = pe[1], ge[1]                          # the same left side "f(x) =": compare the right sides
    elif len(pe) == len(ge) == 2:
        return _equations_equal(pe, ge)
    elif len(pe) == 2 and len(ge) == 1 and _names_answer(pe):
        p = pe[1]
    elif len(ge) == 2 and len(pe) == 1 and _names_answer(ge):
        g = ge[1]
    if p == g and p_scale == g_scale:
        return True
    word = _WORD_RE.match(p)
    if _WORD_RE.match(g) and (len(g) >= 3 or word and (len(p) >= 3 or p.lower() == g.lower())):
        # a word gold wants that word, not a product of its letters: "A \\cdot B \\cdot C \\cdot D" would match
        # every order of the Math12k gold CBAD (an ordering) and "E \\cdot velyn" both Evelyn and Evenly
        return bool(word) and p.lower() == g.lower()
    ap, ag = _parse(p), _parse(g)
    if ap is None or ag is None:
        return False
    if p_scale != 1:
        ap = ("*", ap, ("num", complex(p_scale), Fraction(p_scale)))
    if g_scale != 1:
        ag = ("*", ag, ("num", complex(g_scale), Fraction(g_scale)))
    if _variables(ag, set()):
        return _values_equal(ap, ag)
    if _variables(ap, set()):                        # a constant gold wants a constant
        return _cancels_to(ap, ag)
    return _constants_equal(ap, ag, p, g, p_scale, g_scale)


_INT_LITERAL_RE = re.compile(r"^-?\d+(?:\.0*)?$")


def _names_answer(sides: list[str]) -> bool:
    """Does the left side of "L = R" only name the answer R: a variable, subscripted variable or function call
    ("x = 5", "f(n) = 2n+1"), or 2-3 capital letters naming a segment or angle when R is a constant
    ("AB = 12+12\\sqrt{3}"; not "MR = SRMC", a condition)?"""
    return bool(_LHS_RE.match(sides[0]) or _SEGMENT_RE.match(sides[0]) and _is_constant(sides[1]))


def _is_constant(s: str) -> bool:
    """Is s a parseable expression without variables?"""
    a = _parse(s)
    return a is not None and not _variables(a, set())


def _equations_equal(pe: list[str], ge: list[str]) -> bool:
    """L1 = R1 vs L2 = R2: L1 - R1 == ±(L2 - R2) as expressions."""
    ap, ag = _parse_pair(*pe), _parse_pair(*ge)
    if ap is None or ag is None:
        return False
    return _values_equal(ap, ag) or _values_equal(("neg", ap), ag)


def _parse_pair(lhs: str, rhs: str):
    a, b = _parse(lhs), _parse(rhs)
    return None if a is None or b is None else ("-", a, b)


# ---------------- tokenizer + recursive-descent parser -------------------------------------------------

_TOKEN_RE = re.compile(r"\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+|\\[a-zA-Z]+|\\[{}|]|\S")
_FUNCS = {"sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh", "tanh",
          "ln", "log", "exp"}
_GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "vartheta", "iota", "kappa",
          "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "upsilon", "phi", "varphi", "chi", "psi",
          "omega", "Gamma", "Delta", "Theta", "Lambda", "Xi", "Sigma", "Phi", "Psi", "Omega", "ell", "hbar"}
_ACCENTS = {"dot", "ddot"}                # \\dot{x}_0: a time derivative, a variable of its own
_MUL_OPS = {"*", "\\cdot", "\\times", "\\ast"}
_DIV_OPS = {"/", "\\div"}


class _NotComparable(Exception):
    """The expression cannot be parsed or evaluated safely."""


class _Parser:
    """Recursive descent over the token list; builds a tuple tree:
    ('num', complex, Fraction | None) ('var', name) ('+'|'-'|'*'|'/'|'^', a, b) ('neg', a) ('fn', name, a)
    ('!', a) ('binom', a, b) ('root', radicand, index) ('floor'|'ceil'|'abs', a). A number's Fraction is its exact
    value (None for \\pi, e, i and literals with a huge exponent).

        expr    := term (('+'|'-') term)*
        term    := unary (('*'|'\\cdot'|'\\times'|'/'|'\\div') unary | <implicit> power)*
        unary   := ('-'|'+') unary | power
        power   := postfix ('^' exponent)?          exponent := ('-'|'+') exponent | postfix
        postfix := atom '!'*
        atom    := number | letter[_sub] | \\greek[_sub] | \\dot / \\ddot variable[_sub] | \\pi | ( expr ) | { expr }
                 | \\frac{a}{b} | \\sqrt[n]{a} | \\binom{a}{b} | \\func[^k] arg | \\lfloor expr \\rfloor
                 | \\lceil expr \\rceil | | expr |
    `e` is Euler's number and `i` the imaginary unit; other letters are variables, except that f, g, h, u or an
    uppercase letter directly followed by "(" is a function call, which makes the answer not comparable.
    """

    def __init__(self, tokens: list[str]):
        self.t, self.i, self.depth = tokens, 0, 0

    def peek(self):
        return self.t[self.i] if self.i < len(self.t) else None

    def take(self):
        tok = self.peek()
        if tok is None:
            raise _NotComparable("unexpected end")
        self.i += 1
        return tok

    def expect(self, tok):
        if self.take() != tok:
            raise _NotComparable(f"expected {tok}")

    def enter(self):
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _NotComparable("too deep")

    def parse(self):
        node = self.expr()
        if self.i != len(self.t):
            raise _NotComparable("trailing tokens")
        return node

    def expr(self):
        self.enter()
        node = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            node = (op, node, self.term())
        self.depth -= 1
        return node

    def term(self):
        node = self.unary()
        while True:
            tok = self.peek()
            if tok in _MUL_OPS:
                self.take()
                node = ("*", node, self.unary())
            elif tok in _DIV_OPS:
                self.take()
                node = ("/", node, self.unary())
            elif tok is not None and self.starts_atom(tok):
                node = ("*", node, self.power())
            else:
                return node

    def unary(self):
        if self.peek() in ("-", "+"):
            op = self.take()
            self.enter()
            node = self.unary()
            self.depth -= 1
            return ("neg", node) if op == "-" else node
        return self.power()

    def power(self):
        base = self.postfix()
        if self.peek() == "^":
            self.take()
            return ("^", base, self.exponent())
        return base

    def exponent(self):
        self.enter()
        if self.peek() in ("-", "+"):
            node = ("neg", self.exponent()) if self.take() == "-" else self.exponent()
        else:
            node = self.postfix()
        self.depth -= 1
        return node

    def postfix(self):
        node = self.atom()
        while self.peek() == "!":
            self.take()
            node = ("!", node)
        return node

    @staticmethod
    def starts_atom(tok: str) -> bool:
        if tok[0].isdigit() or tok[0] == "." or tok in ("(", "{", "["):
            return True
        if tok.isalpha() and len(tok) == 1:
            return True
        if tok.startswith("\\") and tok[1:] in _FUNCS | _GREEK | _ACCENTS | {"frac", "sqrt", "binom", "pi",
                                                                            "lfloor", "lceil"}:
            return True
        return False

    def group(self):
        """A macro argument: {expr}, or a single atom (\\frac12 was normalised to braces already)."""
        if self.peek() == "{":
            self.take()
            node = self.expr()
            self.expect("}")
            return node
        return self.atom()

    def subscript(self) -> str:
        """Raw text of a subscript (it only names a variable)."""
        self.take()                                   # '_'
        if self.peek() != "{":
            return self.take()
        self.take()
        out, level = [], 1
        while True:
            tok = self.take()
            level += (tok == "{") - (tok == "}")
            if level == 0:
                return "".join(out)
            out.append(tok)

    def atom(self):
        self.enter()
        node = self._atom()
        self.depth -= 1
        return node

    def _atom(self):
        tok = self.take()
        if tok[0].isdigit() or tok[0] == ".":
            if self.peek() == "_":                    # 4343_6: a base-b numeral, compared as text only
                raise _NotComparable("base numeral")
            return _number(tok)
        if tok in ("(", "{", "["):
            node = self.expr()
            self.expect({"(": ")", "{": "}", "[": "]"}[tok])
            return node
        if tok == "|":
            node = self.expr()
            self.expect("|")
            return ("abs", node)
        if len(tok) == 1 and tok.isalpha():
            if tok == "e" and self.peek() != "_":
                return ("num", complex(math.e), None)
            if tok == "i" and self.peek() != "_":
                return ("num", 1j, None)
            return self.variable(tok)
        if not tok.startswith("\\"):
            raise _NotComparable(f"unexpected {tok}")
        name = tok[1:]
        if name == "pi":
            return ("num", complex(math.pi), None)
        if name in _GREEK:
            return self.variable(tok)
        if name == "frac":
            return ("/", self.group(), self.group())
        if name == "binom":
            return ("binom", self.group(), self.group())
        if name == "sqrt":
            index = ("num", 2 + 0j, Fraction(2))
            if self.peek() == "[":
                self.take()
                index = self.expr()
                self.expect("]")
            return ("root", self.group(), index)
        if name in ("lfloor", "lceil"):
            node = self.expr()
            self.expect("\\r" + name[1:])
            return (name[1:], node)
        if name in _FUNCS:
            return self.function(name)
        if name in _ACCENTS:                          # \\dot{x}_0 and \\dot x_0 are the variable "\\dot x_0"
            inner = self.group()
            if inner[0] != "var":
                raise _NotComparable(f"{tok} of an expression")
            return self.variable(f"{tok} {inner[1]}")
        raise _NotComparable(f"unknown command {tok}")

    def variable(self, name: str):
        if self.peek() == "_":
            name += "_" + self.subscript()
        if self.peek() == "(" and _is_function_name(name):   # f(x), I(0): a call, not a product
            raise _NotComparable(f"function call {name}(...)")
        return ("var", name)

    def function(self, name: str):
        base = None
        if name == "log" and self.peek() == "_":      # \log_{b} x = ln x / ln b
            self.take()
            tok = self.peek()
            if tok is not None and tok[0].isdigit() and len(tok) > 1:   # \log_28 (LaTeX: base 2, then 8)
                self.t[self.i:self.i + 1] = [tok[0], tok[1:]]
            base = self.group()
        power = None
        if self.peek() == "^":                        # \sin^2 x = (\sin x)^2
            self.take()
            power = self.exponent()
        arg = self.group() if self.peek() in ("(", "{") else self.power()
        node = ("fn", name, arg)
        if base is not None:
            node = ("/", ("fn", "ln", arg), ("fn", "ln", base))
        return node if power is None else ("^", node, power)


def _is_function_name(name: str) -> bool:
    """Letters that name functions when directly followed by "(": f, g, h, u and any uppercase letter (also
    \\Gamma, \\Phi, ...). x(x+1), 2a(b+c), n(n+1)/2 stay products."""
    letter = name.split("_")[0].lstrip("\\")
    return letter in ("f", "g", "h", "u") or letter[0].isupper()


_EXPONENT_PART_RE = re.compile(r"[eE]([-+]?\d+)$")


def _number(tok: str):
    """A numeric literal: its float value and its exact value (None for an exponent too large to expand)."""
    m = _EXPONENT_PART_RE.search(tok)
    exact = Fraction(tok) if not m or abs(int(m.group(1))) <= MAX_EXPONENT else None
    return ("num", complex(float(tok)), exact)


@lru_cache(maxsize=1 << 10)
def _parse(s: str):
    """Expression tree of a normalised scalar answer, or None when it is not a parseable expression."""
    if not s or len(s) > MAX_ANSWER_CHARS or "\\infty" in s:
        return None
    tokens = _TOKEN_RE.findall(s)
    if len(tokens) > MAX_TOKENS:
        return None
    try:
        return _Parser(tokens).parse()
    except (_NotComparable, ValueError, OverflowError):
        return None


def _variables(node, out: set) -> set:
    if node[0] == "var":
        out.add(node[1])
    else:
        for child in node[1:]:
            if isinstance(child, tuple):
                _variables(child, out)
    return out


def _has_op(node, ops: set) -> bool:
    """Does the tree contain a node whose operator is in `ops`?"""
    return node[0] in ops or any(isinstance(c, tuple) and _has_op(c, ops) for c in node[1:])


_ARITH = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
_CMATH = {"sin": cmath.sin, "cos": cmath.cos, "tan": cmath.tan, "arcsin": cmath.asin, "arccos": cmath.acos,
          "arctan": cmath.atan, "sinh": cmath.sinh, "cosh": cmath.cosh, "tanh": cmath.tanh, "ln": cmath.log,
          "log": cmath.log, "exp": cmath.exp,
          "cot": lambda z: 1 / cmath.tan(z), "sec": lambda z: 1 / cmath.cos(z), "csc": lambda z: 1 / cmath.sin(z)}


def _real(z: complex) -> float:
    if abs(z.imag) > 1e-9 * max(1.0, abs(z.real)):
        raise _NotComparable("real argument expected")
    return z.real


def _evaluate(node, env: dict) -> complex:
    """Value of an expression tree at the point `env` (complex floats, every operation guarded)."""
    op = node[0]
    if op == "num":
        return node[1]
    if op == "var":
        return env[node[1]]
    if op == "neg":
        return -_evaluate(node[1], env)
    if op == "fn":
        x = _evaluate(node[2], env)
        if node[1] == "exp" and abs(x.real) > 700:
            raise _NotComparable("exp overflow")
        return _CMATH[node[1]](x)
    if op in ("floor", "ceil"):                      # round-off next to an integer is snapped: 2.9999999999999996 -> 3
        x = _real(_evaluate(node[1], env))
        x = round(x) if abs(x - round(x)) <= 1e-9 * max(1.0, abs(x)) else x
        return complex(math.floor(x) if op == "floor" else math.ceil(x))
    if op == "abs":
        return complex(abs(_evaluate(node[1], env)))
    if op == "!":                                    # n! exactly; x! = Gamma(x + 1) between integers
        x = _real(_evaluate(node[1], env))
        if not x <= 170:
            raise _NotComparable("factorial > 170!")
        return complex(math.factorial(int(x)) if x == int(x) and x >= 0 else math.gamma(x + 1))
    a, b = _evaluate(node[1], env), _evaluate(node[2], env)
    if op in _ARITH:
        return _ARITH[op](a, b)
    if op == "^":
        return _power(a, b)
    if op == "root":
        return _root(a, b)
    if op == "binom":
        n, k = _real(a), _real(b)
        if n == int(n) and k == int(k) and 0 <= n <= 10_000:
            return complex(float(math.comb(int(n), int(k)))) if k >= 0 else 0j
        return complex(math.gamma(n + 1) / (math.gamma(k + 1) * math.gamma(n - k + 1)))
    raise _NotComparable(f"unknown node {op}")


def _power(a: complex, b: complex) -> complex:
    if abs(b) > MAX_EXPONENT:
        raise _NotComparable("exponent too large")
    a = complex(a.real, a.imag + 0.0)                # -0.0 -> +0.0: (-1)^{1/2} is i, not -i
    if b.imag == 0 and a.imag == 0 and (a.real >= 0 or b.real == int(b.real)):
        return complex(a.real ** b.real)             # real power: exact for integers, no complex round-off
    return a ** b


def _root(a: complex, n: complex) -> complex:
    """\\sqrt[n]{a}: the principal square root (\\sqrt{-4} = 2i); an odd root of a negative real is the real
    root (\\sqrt[3]{-8} = -2); other cases are the principal power a^(1/n)."""
    a = complex(a.real, a.imag + 0.0)
    if n == 2:
        return cmath.sqrt(a) if a.imag or a.real < 0 else complex(math.sqrt(a.real))
    if a.imag == 0 and a.real < 0 and n.imag == 0 and n.real == int(n.real) and int(n.real) % 2 == 1:
        return -_power(-a, 1 / n)
    return _power(a, 1 / n)


# ---------------- exact values -------------------------------------------------------------------------

_EXACT_BITS = 20_000      # larger exact intermediate values: fall back to floating point


class _Inexact(Exception):
    """The tree has no exact rational value (variables, pi, e, i, roots, functions, huge values)."""


def _exact(node) -> Fraction | None:
    """The value of a rational constant tree in exact int/Fraction arithmetic, or None when it is not one."""
    try:
        return _rational(node)
    except (_Inexact, ZeroDivisionError, RecursionError):
        return None


def _rational(node) -> Fraction:
    """Exact value of `node`; every intermediate result is capped at _EXACT_BITS bits (numerator and
    denominator), so a long sum of huge fractions cannot grow quadratically."""
    x = _rational_op(node)
    if max(x.numerator.bit_length(), x.denominator.bit_length()) > _EXACT_BITS:
        raise _Inexact
    return x


def _rational_op(node) -> Fraction:
    op = node[0]
    if op == "num":
        if node[2] is None:
            raise _Inexact
        return node[2]
    if op == "neg":
        return -_rational(node[1])
    if op in ("floor", "ceil", "abs"):
        x = _rational(node[1])
        return Fraction(math.floor(x) if op == "floor" else math.ceil(x) if op == "ceil" else abs(x))
    if op == "!":
        x = _rational(node[1])
        if x.denominator != 1 or not 0 <= x <= 170:
            raise _Inexact
        return Fraction(math.factorial(int(x)))
    if op not in ("+", "-", "*", "/", "^", "binom"):
        raise _Inexact                               # var, fn, root
    a, b = _rational(node[1]), _rational(node[2])
    if op in _ARITH:
        return _ARITH[op](a, b)
    if op == "^":                                    # integer exponents only, bounded size of the result
        bits = max(a.numerator.bit_length(), a.denominator.bit_length())
        if b.denominator != 1 or bits * abs(b) > _EXACT_BITS:   # not MAX_EXPONENT: 2^{1009} is a gold
            raise _Inexact
        return a ** int(b)
    if a.denominator != 1 or b.denominator != 1 or not 0 <= a <= 10_000:   # binom
        raise _Inexact
    return Fraction(math.comb(int(a), int(b)) if b >= 0 else 0)


# ---------------- comparison rules ---------------------------------------------------------------------

_FLOAT_NOISE = Fraction(1, 10**12)    # a decimal gold that is a printed float (SVAMP's 0.6666666666666666 = 2/3)
_ROUND_OFF = 1e-9                     # relative round-off of a floating-point comparison
_ZERO_GOLD_ABS = 1e-12                # absolute round-off, only where the gold's value is exactly 0
_DECIMAL_RE = re.compile(r"\d\.\d|\d[eE][-+]?\d")   # a decimal literal: 408.04, 0.5, 4.5e33
# a decimal literal, optionally in scientific notation: 408.04, -0.5, 2.88\times10^{16}, 4.5e33
_DECIMAL_LITERAL_RE = re.compile(r"^-?(\d+)\.(\d+)(?:[eE]([-+]?\d+)|(?:\\times|\\cdot)10\^(?:\{([-+]?\d+)\}|(\d)))?$")


def _is_exact_text(s: str) -> bool:
    """No decimal literal anywhere, or an integer literal with zero decimals (142.0)."""
    return not _DECIMAL_RE.search(s) or bool(_INT_LITERAL_RE.match(s))


def _literal_digits(s: str) -> tuple[Fraction, int] | None:
    """(unit of the last written digit, number of significant digits) of a decimal literal: 408.04 -> (1/100, 5),
    4.5e33 -> (10^32, 2), 0.010 -> (1/1000, 2); None when s is no decimal literal, when its decimals are all zero
    and it has no exponent (142.0 is an integer), or when its exponent exceeds MAX_EXPONENT."""
    m = _DECIMAL_LITERAL_RE.match(s)
    if not m or (not m.group(2).strip("0") and not any(m.group(3, 4, 5))):
        return None
    power = int(next((x for x in m.group(3, 4, 5) if x), 0))
    if abs(power) > MAX_EXPONENT:
        return None
    return Fraction(10) ** (power - len(m.group(2))), len((m.group(1) + m.group(2)).lstrip("0"))


def _constants_equal(ap, ag, p: str, g: str, p_scale: Fraction = Fraction(1), g_scale: Fraction = Fraction(1)) -> bool:
    """Equality of two constant trees (no variables) parsed from the normalised texts p, g (rules a-d of the
    module docstring, point 4); p_scale / g_scale are the percent factors (1 or 1/100), which scale the units of
    the written digits."""
    xp, xg = _exact(ap), _exact(ag)
    gold_digits, pred_digits = _literal_digits(g), _literal_digits(p)
    if gold_digits is not None:                      # a: gold 408.04 or 4.5e33
        g_unit, g_sig = gold_digits[0] * g_scale, gold_digits[1]
        p_unit = pred_digits[0] * p_scale if pred_digits is not None else None
        return _decimal_gold_equal(ap, ag, xp, xg, g_unit, g_sig, p_unit, _is_exact_text(p))
    if not _is_exact_text(g):                        # d: decimals inside a gold expression (2.5\pi): relative 1e-4
        return _near(ap, ag, xp, xg, rel=Fraction(1, 10_000))
    if _same(ap, ag, xp, xg):                        # b: exact comparison
        return True
    if pred_digits is None or (xg is not None and xg.denominator == 1):
        return False                                 # b: an exact or integer gold gets no slack
    p_unit, p_sig = pred_digits[0] * p_scale, pred_digits[1]
    return p_sig >= 3 and _rounded_or_truncated(ag, xp, xg, p_unit)   # c: 0.3333 for 1/3, 3.14 for pi


def _decimal_gold_equal(ap, ag, xp, xg, g_unit: Fraction, g_sig: int, p_unit: Fraction | None,
                        p_exact: bool) -> bool:
    """Rule a: (i) equal (a printed float's noise allowed); else, for a gold with 2+ significant digits, a
    prediction that rounds to the gold at its last digit when it is (ii) a decimal literal with a finer last digit
    (1.602 for 1.6) or (iii) an exact expression and the gold has 3+ significant digits (\\pi for 3.14)."""
    if _near(ap, ag, xp, xg, rel=_FLOAT_NOISE):     # (i) 2/3 for SVAMP's 0.6666666666666666
        return True
    if g_sig <= 1:                                   # 0.5, 0.01: exact
        return False
    if p_unit is not None:                           # (ii) more digits than the gold
        finer = p_unit < g_unit
    else:                                            # (iii) no decimal literal in the prediction
        finer = p_exact and g_sig >= 3
    return finer and _rounds_to(ap, xp, xg, g_unit / 2)


def _rounds_to(ap, xp, xg, half: Fraction) -> bool:
    """Does the prediction round (half away from zero) to the gold at half-unit `half`: the same sign and
    |p| in [|g| - half, |g| + half)?"""
    vp = xp if xp is not None else _real_value(ap)
    if vp is None or xg is None or (vp < 0) != (xg < 0):
        return False
    return abs(xg) - half <= abs(vp) < abs(xg) + half


def _rounded_or_truncated(ag, xp, xg, p_unit: Fraction) -> bool:
    """Rule c: is the decimal prediction the gold's value rounded half away from zero, or truncated, at the
    prediction's last digit (p_unit)? 0.6666 and 0.6667 for 2/3, not 0.6668; 142.86 for 1000/7, not 142.87."""
    vg = xg if xg is not None else _real_value(ag)
    if vg is None or xp is None or (xp < 0) != (vg < 0):
        return False
    steps = Fraction(abs(vg)) / p_unit               # the gold in units of the prediction's last digit, exactly
    return abs(xp) / p_unit in (math.floor(steps), math.floor(steps + Fraction(1, 2)))


def _real_value(node) -> float | None:
    """The real value of a constant tree in floating point, or None (undefined, non-finite or not real)."""
    v = _value(node, {})
    return None if v is None or _non_real(v) else v.real


def _same(ap, ag, xp, xg) -> bool:
    """Exact equality: in int/Fraction when both values are rational, else in floating point up to round-off."""
    return xp == xg if xp is not None and xg is not None else _near(ap, ag, xp, xg)


def _near(ap, ag, xp, xg, rel: Fraction = Fraction(0)) -> bool:
    """|p - g| <= rel * |g|: exactly when both values are rational, else in floating point with round-off allowed
    (relative 1e-9 of the larger value; absolute 1e-12 only where the gold's value is exactly 0)."""
    if xp is not None and xg is not None:
        return abs(xp - xg) <= rel * abs(xg)
    va, vb = _value(ap, {}), _value(ag, {})
    if va is None or vb is None:
        return False
    tol = float(rel) * abs(vb) + _ROUND_OFF * max(abs(va), abs(vb)) + (_ZERO_GOLD_ABS if vb == 0 else 0.0)
    return abs(va - vb) <= tol


# ---------------- expressions with variables -----------------------------------------------------------

_POINT_STEPS = (0.7548776662466927, 0.5698402909980532)   # a 2-d low-discrepancy (Kronecker) sequence
_POINT_LO, _POINT_SPAN = 0.3, 7.2                          # positive coordinates lie in [0.3, 7.5)
_SIGNED_OPS = {"abs", "floor", "ceil"}


def _points(names: list[str], count: int = 6, first: int = 0) -> list[dict]:
    """Fixed pseudo-random evaluation points: each variable gets a distinct non-integer value in [0.3, 7.5)
    (wide enough for \\lfloor n/3 \\rfloor to differ from \\lfloor n/2 \\rfloor, |x-3| from 3-x)."""
    a, b = _POINT_STEPS
    return [{v: complex(_POINT_LO + _POINT_SPAN * (((j + 1) * a + (k + 1) * b) % 1.0)) for j, v in enumerate(names)}
            for k in range(first, first + count)]


def _signed_points(names: list[str], count: int = 4) -> list[dict]:
    """Points with negative coordinates (all negative, then alternating signs), for |x|, floor and ceil."""
    pts = _points(names, count, first=16)
    return [{v: -z if k < 2 or (j + k) % 2 else z for j, (v, z) in enumerate(env.items())}
            for k, env in enumerate(pts)]


_INTEGERS = (2, 5, 3, 8, 4, 7, 6, 9)


def _integer_points(names: list[str], count: int = 4) -> list[dict]:
    """Points with small integer coordinates, even and odd (\\lceil n/2 \\rceil != \\lfloor n/2 \\rfloor + 1)."""
    return [{v: complex(_INTEGERS[(k + 3 * j) % len(_INTEGERS)]) for j, v in enumerate(names)}
            for k in range(count)]


_VARIABLE_REL = 1e-8      # relative tolerance of expressions with variables at each point


def _values_equal(a, b, rel: float = _VARIABLE_REL) -> bool:
    """Do two expression trees with variables agree at every evaluation point (relative tolerance `rel`; `b` is
    the gold)?

    Positive points: where both sides are defined they must agree, a point where only one side is defined
    fails, one outside both domains is skipped (\\lfloor\\sqrt{n-1}\\rfloor at n < 1); at least 3 must compare.
    When a tree holds |.|, floor or ceil, the signed and the integer points are tried too; there a point where
    either side is undefined or not real is skipped (the principal branch of \\sqrt{x}\\sqrt{y} or \\ln x at
    negative x is no real-domain identity).
    Variables that `a` multiplies by a constant 0 do not count: "0 \\text{ (or } 7\\text{)}" (0·o·r·7) is a
    hedge, not 0, and "x + 0 \\text{ (or } 7\\text{)}" is not x."""
    if _zero_factor(a):
        return False
    names = sorted(_variables(a, set()) | _variables(b, set()))
    compared = 0
    for env in _points(names):
        va, vb = _value(a, env), _value(b, env)
        if va is None and vb is None:
            continue
        if va is None or vb is None or not _close(va, vb, rel):
            return False
        compared += 1
    if compared < 3:
        return False
    if not (_has_op(a, _SIGNED_OPS) or _has_op(b, _SIGNED_OPS)):
        return True
    for env in _signed_points(names) + _integer_points(names):
        va, vb = _value(a, env), _value(b, env)
        if va is None or vb is None or _non_real(va) or _non_real(vb):
            continue
        if not _close(va, vb, rel):
            return False
    return True


def _cancels_to(ap, ag) -> bool:
    """A prediction with variables against a constant gold is right only when its variables cancel and it is
    identically the gold (\\sin^2x+\\cos^2x = 1, (x+1)^2-x^2-2x-1 = 0): equal to round-off (relative 1e-9) at
    every evaluation point, and exactly where its value there is rational (1000001+0x != 1000000); not through a
    factor 0 (_values_equal)."""
    if not _values_equal(ap, ag, rel=_ROUND_OFF):
        return False
    xg = _exact(ag)
    for env in _points(sorted(_variables(ap, set()))):
        xp = _exact(_substitute(ap, env))
        if xp is not None and xg is not None and xp != xg:
            return False
    return True


def _zero_factor(node) -> bool:
    """Does the tree hold a product (or a quotient's numerator) of a constant equal to 0 and an expression with
    variables?"""
    if node[0] in ("*", "/"):
        pairs = [(node[1], node[2]), (node[2], node[1])] if node[0] == "*" else [(node[1], node[2])]
        if any(_variables(b, set()) and not _variables(a, set()) and _value(a, {}) == 0 for a, b in pairs):
            return True
    return any(isinstance(c, tuple) and _zero_factor(c) for c in node[1:])


def _substitute(node, env: dict):
    """The tree with every variable replaced by its (real) value at `env` as an exact number."""
    if node[0] == "var":
        z = env[node[1]]
        return ("num", z, Fraction(z.real))
    return tuple(_substitute(c, env) if isinstance(c, tuple) else c for c in node)


def _value(node, env: dict) -> complex | None:
    """The value at `env`, or None where the expression is undefined (an error or a non-finite value)."""
    try:
        v = _evaluate(node, env)
    except (_NotComparable, ArithmeticError, ValueError, KeyError, RecursionError):
        return None
    return v if cmath.isfinite(v) else None


def _non_real(z: complex) -> bool:
    return abs(z.imag) > 1e-9 * abs(z)


def _close(va: complex, vb: complex, rel: float) -> bool:
    """Relative agreement; an absolute 1e-12 only where the gold's value vb is exactly 0 (round-off such as
    (x+1)^2-x^2-2x-1 against 0), so 0x is not 8.224 \\times 10^{-19}."""
    return abs(va - vb) <= rel * max(abs(va), abs(vb)) + (_ZERO_GOLD_ABS if vb == 0 else 0.0)


# ======================================================================================================
# grade / reward
# ======================================================================================================

_THOUSANDS_RE = re.compile(r"^-?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?$")   # 10,000; not 0,166
# in an answer's raw text, commas that separate answers: a space after one (not ", \\!", a thin-space separator) or
# degree marks ("81, 256" and "60^\\circ, 120^\\circ" are Math12k lists that normalise to 81,256 and 60,120)
_LIST_COMMA_RE = re.compile(r",\s+(?!\s|\\!)|\\circ|\u00b0")


def _thousands(s: str, raw: str) -> bool:
    """Is the normalised answer s one number with thousands separators (10,000)? Not when its raw text writes the
    commas as list separators (_LIST_COMMA_RE) or has none of them ("1 \\text{ or } 166" normalises to 1,166)."""
    return bool(_THOUSANDS_RE.match(s)) and s.count(",") == raw.count(",") and not _LIST_COMMA_RE.search(raw)


def _gold_text(gold) -> str:
    if isinstance(gold, bool) or not isinstance(gold, (str, numbers.Number)):   # a tensor, set, dict: its repr
        raise TypeError(f"gold answer {gold!r}: expected a string or a number (or a list of them)")
    if isinstance(gold, float) and gold.is_integer():
        return str(int(gold))                         # 142.0 -> "142"
    return str(gold)


def grade(pred: str | None, gold) -> bool:
    """Is the predicted answer `pred` (e.g. extract_answer's output) equivalent to `gold`?

    gold: a string, an int/float (AMC's 142.0), or a list/tuple of alternatives (any one may match).
    See the module docstring for the rules and the tolerance / percent decisions.
    """
    if pred is None or gold is None:
        return False
    if isinstance(gold, (list, tuple)):
        return any(grade(pred, g) for g in gold)
    p_raw, g_raw = str(pred), _gold_text(gold)
    if len(p_raw) > MAX_ANSWER_CHARS or len(g_raw) > MAX_ANSWER_CHARS:
        return p_raw.strip() == g_raw.strip()
    p, g = normalize(p_raw), normalize(g_raw)
    if not g:                                        # an empty gold (a broken record) rewards nothing
        return False
    # thousands separators: a gold "10,000" is only a number (never the list 10, 000: "10, 0" is wrong for it),
    # unless its raw text writes the commas as list separators ("81, 256"); a prediction "1,000" is tried both as a
    # list and as a number, "1, 000" and "0,166" only as a list
    p2 = p.replace(",", "") if _thousands(p, p_raw) else p
    g2 = g.replace(",", "") if _thousands(g, g_raw) else g
    # an expression tree too deep for Python's recursion (400 implicit factors "xx...x" chain 400 levels deep) is not
    # comparable: a RecursionError must never escape into the training loop
    try:
        if g2 == g and _equiv(p, g, _Budget()):
            return True
        if (p2, g2) != (p, g) and _equiv(p2, g2, _Budget()):
            return True
        # percent: exactly one side wrote % -> its value / 100 is accepted as well
        pp, gp = ("%" in p_raw or "percent" in p_raw), ("%" in g_raw or "percent" in g_raw)
        if pp != gp and _structure(p2)[0] == _structure(g2)[0] == "scalar":
            percent = Fraction(1, 100)
            return _scalar_equiv(p2, g2, p_scale=percent if pp else Fraction(1),
                                 g_scale=percent if gp else Fraction(1))
    except (_NotComparable, RecursionError):
        return False
    return False


def reward(completion_text: str, gold) -> float:
    """The 0/1 verifiable reward of spec §1: 1.0 iff the last boxed answer is equivalent to the gold."""
    return 1.0 if grade(extract_answer(completion_text), gold) else 0.0


# ======================================================================================================
# Evaluation
# ======================================================================================================

BENCHMARKS = ("aime", "amc", "math500", "minerva", "olympiad")   # the suite of spec §6
OTHER_BENCHMARKS = ("gsm8k", "svamp")                            # their test sets are evaluable too


def evaluate(model, tokenizer, examples, *, batch_size: int = 16, max_new_tokens: int = 3000,
             temperature: float = 0.0, top_p: float = 1.0, skip_mask=None, generator=None, progress=None):
    """Generate one completion per example (greedy by default) and grade it -> (accuracy, records).

    Prompts are the qwen_math chat template (data.chat_prompt) encoded with `tokenizer`; they are sorted by
    length (longest first, so an out-of-memory shows at once and batches carry little padding) and the
    records come back in the order of `examples`. Each record: question, gold, completion (decoded without
    special tokens), extracted, correct, num_tokens (generated tokens, EOS included). `progress(done, total)` is
    called after each batch when given. A completion stops where prompt + completion reaches the model's
    max_position_embeddings (as vLLM's max_model_len does): positions beyond it were never trained.
    """
    import torch

    import data
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: expected an integer >= 1")
    valid_vocab = getattr(tokenizer, "vocab_size", None)
    check_tokenizer_fits(valid_vocab, getattr(getattr(model, "config", None), "vocab_size", None))
    prompts = [tokenizer.encode(data.chat_prompt(ex.question)) for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None) or float("inf")
    if prompts and len(prompts[order[0]]) >= context:
        raise ValueError(f"a prompt has {len(prompts[order[0]])} tokens: no room to generate within the model's "
                         f"max_position_embeddings = {context} (question: {examples[order[0]].question[:60]!r})")
    completions, lengths = [""] * len(prompts), [0] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        room = [min(max_new_tokens, context - len(prompts[i])) for i in idx]   # per row, up to the context
        with torch.no_grad():
            out = model.generate([prompts[i] for i in idx], max_new_tokens=max(room), temperature=temperature,
                                 top_p=top_p, skip_mask=skip_mask, eos_token_ids=tuple(tokenizer.eos_token_ids),
                                 pad_token_id=tokenizer.pad_token_id, generator=generator,
                                 valid_vocab_size=valid_vocab)
        tokens, mask = out.tokens.tolist(), out.mask.tolist()                    # [b, Tn]
        for row, i in enumerate(idx):
            ids = [t for t, m in zip(tokens[row][:room[row]], mask[row]) if m]
            completions[i], lengths[i] = tokenizer.decode(ids, skip_special_tokens=True), len(ids)
        if progress is not None:
            progress(min(start + batch_size, len(order)), len(order))
    records = []
    for ex, text, n in zip(examples, completions, lengths):
        pred = extract_answer(text)
        records.append({"question": ex.question, "gold": ex.answer, "completion": text, "extracted": pred,
                        "correct": grade(pred, ex.answer), "num_tokens": n})
    accuracy = sum(r["correct"] for r in records) / len(records) if records else 0.0
    return accuracy, records


def check_tokenizer_fits(tokenizer_ids, model_vocab, tokenizer_name="the tokenizer",
                         model_name="the model") -> None:
    """ValueError unless a tokenizer of `tokenizer_ids` ids fits a model with vocab_size `model_vocab` (a
    tokenizer for another model family); None for either skips the check."""
    if tokenizer_ids is not None and model_vocab is not None and tokenizer_ids > model_vocab:
        raise ValueError(f"{tokenizer_name} has {tokenizer_ids} ids but {model_name} has vocab_size "
                         f"{model_vocab}; expected a tokenizer of at most {model_vocab} ids")


def format_table(results: dict) -> str:
    """results: name -> {"n": int, "accuracy": float, ...}; pass@1 in percent plus the macro average."""
    lines = [f"{'benchmark':<12}{'n':>6}{'pass@1':>9}"]
    for name, r in results.items():
        lines.append(f"{name:<12}{r['n']:>6}{100 * r['accuracy']:>8.1f}%")
    if results:
        macro = sum(r["accuracy"] for r in results.values()) / len(results)
        lines.append(f"{'macro avg':<12}{'':>6}{100 * macro:>8.1f}%")
    return "\n".join(lines)


def run_benchmarks(model, tokenizer, data_dir, names, out_path=None, *, limit: int | None = None,
                   print_fn=print, evaluate_fn=None, **gen_kwargs) -> dict:
    """Evaluate on each benchmark in `names` (data.load_dataset(name, data_dir, "test")), print the pass@1
    table with the macro average, and write every prediction (benchmark, index, question, gold, completion,
    extracted, correct, num_tokens) to `out_path` as JSON lines, atomically.
    Returns {"benchmarks": {name: {"n", "accuracy", "seconds"}}, "macro": float}.
    gen_kwargs go to evaluate() (batch_size, max_new_tokens, temperature, top_p, skip_mask, generator);
    evaluate_fn replaces evaluate (same signature and result), e.g. nested_reft's version sharded over ranks."""
    import data
    evaluate_fn = evaluate_fn or evaluate
    names = check_benchmarks(names)
    suites = {name: data.load_dataset(name, data_dir, "test")[:limit] for name in names}   # every file, up front
    results, all_records = {}, []
    for name, examples in suites.items():
        t0 = time.time()
        acc, records = evaluate_fn(model, tokenizer, examples, **gen_kwargs)
        results[name] = {"n": len(records), "accuracy": acc, "seconds": time.time() - t0}
        all_records += [{"benchmark": name, "index": i, **r} for i, r in enumerate(records)]
        print_fn(f"{name}: pass@1 {100 * acc:.1f}% on {len(records)} problems ({results[name]['seconds']:.0f}s)")
    print_fn(format_table(results))
    if out_path is not None:
        write_jsonl(out_path, all_records)
        print_fn(f"predictions: {out_path}")
    macro = sum(r["accuracy"] for r in results.values()) / len(results) if results else 0.0
    return {"benchmarks": results, "macro": macro}


def check_benchmarks(names) -> list[str]:
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    known = BENCHMARKS + OTHER_BENCHMARKS
    for n in names:
        if n not in known:
            raise ValueError(f"unknown benchmark {n!r}; expected a comma-separated list of {', '.join(known)}")
    if not names:
        raise ValueError(f"no benchmark given; expected a comma-separated list of {', '.join(known)}")
    return list(names)


def write_jsonl(path, records) -> None:
    """Write records as JSON lines, atomically (data.write_text_atomic)."""
    from data import write_text_atomic
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def draw_eval_skip_mask(n_layers: int, ratio: float, border: int, seed: int) -> list[bool]:
    """One skip mask for a whole evaluation (the nested model of spec §2), drawn with nested_reft's layer-skip
    functions from a CPU generator seeded with `seed`."""
    import torch

    import nested_reft
    return nested_reft.draw_skip_mask(n_layers, ratio, border, torch.Generator(device="cpu").manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------
# CLI


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message):                        # one line, exit code 2
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _ArgumentParser(prog="eval.py", description="pass@1 of a Qwen2 checkpoint on the math benchmarks "
                        "(greedy by default), with an optional layer-skipped nested model.")
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors), e.g. a "
                   "run's RUN/checkpoint or RUN/sft")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    p.add_argument("--benchmarks", default=",".join(BENCHMARKS),
                   help=f"comma-separated, from {', '.join(BENCHMARKS + OTHER_BENCHMARKS)} (default: the 5)")
    p.add_argument("--data", default=None, help="datasets folder (default: $NESTED_REFT_DATA, else shared/data "
                   "beside the project folder, i.e. ../shared/data from the folder that holds eval.py)")
    p.add_argument("--skip-ratio", type=float, default=0.0, help="r: skip k = round(r*N) layers (default 0)")
    p.add_argument("--skip-border", type=int, default=1, help="e: layers never skipped at each end (default 1)")
    p.add_argument("--max-new-tokens", type=int, default=3000)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    p.add_argument("--out", default=None, help="predictions JSONL (default: runs/eval-<model>-<time>.jsonl, "
                   "<model> the model folder's name, after its parent's for RUN/checkpoint and RUN/sft: "
                   "runs/eval-RUN-checkpoint-<time>.jsonl)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto = bfloat16 on cuda, float32 on cpu")
    p.add_argument("--seed", type=int, default=0, help="seeds the skip mask and sampling (temperature > 0)")
    return p


def _check_args(a) -> None:
    if not 0 <= a.skip_ratio < 1:
        raise ValueError(f"--skip-ratio {a.skip_ratio}: expected a number in [0, 1)")
    if a.skip_border < 0:
        raise ValueError(f"--skip-border {a.skip_border}: expected an integer >= 0")
    for key in ("max_new_tokens", "batch_size"):
        if getattr(a, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} {getattr(a, key)}: expected an integer >= 1")
    if a.limit is not None and a.limit < 1:
        raise ValueError(f"--limit {a.limit}: expected an integer >= 1")
    if not (a.temperature >= 0 and math.isfinite(a.temperature)):
        raise ValueError(f"--temperature {a.temperature}: expected a number >= 0")
    if not 0 < a.top_p <= 1:
        raise ValueError(f"--top-p {a.top_p}: expected a number in (0, 1]")
    if not -2**63 <= a.seed < 2**64:                 # what torch.Generator.manual_seed takes
        raise ValueError(f"--seed {a.seed}: expected an integer in [-2^63, 2^64)")
    _check_dir("--model", a.model, "a checkpoint directory (config.json + safetensors)", ("config.json",))
    if a.tokenizer is not None:
        _check_dir("--tokenizer", a.tokenizer, "a tokenizer directory (tokenizer.json)",
                   ("tokenizer.json", "vocab.json"))
    a.data = resolve_data_dir(a.data)
    if a.out is not None:
        _check_out(a.out)


# where eval.py looks for the datasets when neither --data nor $NESTED_REFT_DATA is given: the developers'
# layout, shared/data beside the project folder
DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "shared" / "data"


def resolve_data_dir(data_dir: str | None) -> str:
    """--data, else $NESTED_REFT_DATA, else DEFAULT_DATA_DIR; FileNotFoundError naming where it came from."""
    if data_dir is not None:
        source = f"--data {data_dir}"
    elif os.environ.get("NESTED_REFT_DATA"):
        data_dir = os.environ["NESTED_REFT_DATA"]
        source = f"NESTED_REFT_DATA={data_dir}"
    else:
        if not DEFAULT_DATA_DIR.is_dir():
            raise FileNotFoundError("no data folder: pass --data DIR or set NESTED_REFT_DATA (see the README's "
                                    "Data section)")
        return str(DEFAULT_DATA_DIR)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{source}: datasets folder not found")
    return data_dir


def _check_dir(flag: str, path: str, expected: str, markers: tuple[str, ...]) -> None:
    """`path` must be a directory; a file or a training run's folder (RUN/checkpoint, RUN/sft) is named."""
    if os.path.isfile(path):
        raise NotADirectoryError(f"{flag} {path}: is a file, expected {expected}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{flag} {path}: directory not found, expected {expected}")
    if not any(os.path.exists(os.path.join(path, m)) for m in markers):
        subs = [os.path.join(path, d) for d in ("checkpoint", "sft") if os.path.isdir(os.path.join(path, d))]
        if subs:
            alt = f" (or {subs[1]})" if len(subs) > 1 else ""
            raise ValueError(f"{flag} {path}: is a run folder: pass {subs[0]}{alt}")


def _check_out(path: str) -> None:
    """--out must be a file that can be written once the evaluation is done: not a directory, and under a
    directory (checked before the model is loaded, not after hours of generation)."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"--out {path}: is a directory, expected a .jsonl file path")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"--out {path}: {parent} is a file, expected a directory")


def default_out_path(model: str, now: float | None = None) -> str:
    """runs/eval-<name>-<time>.jsonl for the model folder <name>; a run's RUN/checkpoint and RUN/sft give
    eval-RUN-checkpoint-... and eval-RUN-sft-..., so evaluations of different runs do not share a stem."""
    d = Path(os.path.abspath(model))
    name = f"{d.parent.name}-{d.name}" if d.name in ("checkpoint", "sft") and d.parent.name else d.name or "model"
    return os.path.join("runs", f"eval-{name}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}.jsonl")


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        _check_args(a)
        names = check_benchmarks(a.benchmarks)
        import torch

        import data
        import qwen2
        device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        qwen2.parse_device(device, "--device")
        dtype = a.dtype if a.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
        tokenizer = data.Tokenizer.load(a.tokenizer or a.model)
        model_vocab = qwen2.Qwen2Config.from_json(os.path.join(a.model, "config.json")).vocab_size
        if a.tokenizer is not None:                  # checked before the weights are read
            check_tokenizer_fits(tokenizer.vocab_size, model_vocab, f"--tokenizer {a.tokenizer}: the tokenizer",
                                 f"the model {a.model}")
        else:
            check_tokenizer_fits(tokenizer.vocab_size, model_vocab, f"--model {a.model}: its tokenizer",
                                 "its config.json")
        model = qwen2.Qwen2.from_pretrained(a.model, dtype=dtype, device=device).eval()
        n_layers = model.config.num_hidden_layers
        skip_mask = draw_eval_skip_mask(n_layers, a.skip_ratio, a.skip_border, a.seed) if a.skip_ratio > 0 else None
        if skip_mask is not None:
            print(f"nested model: skipping layers {[i for i, s in enumerate(skip_mask) if s]} of {n_layers}")
        generator = torch.Generator(device=device).manual_seed(a.seed) if a.temperature > 0 else None
        out = a.out or default_out_path(a.model)
        run_benchmarks(model, tokenizer, a.data, names, out, limit=a.limit, batch_size=a.batch_size,
                       max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                       skip_mask=skip_mask, generator=generator,
                       progress=lambda d, n: print(f"  {d}/{n}", file=sys.stderr, flush=True))
    except (ValueError, OSError) as e:           # OSError: no such file, no permission, a full disk, a read-only
        print(f"error: {e}", file=sys.stderr)     # filesystem, a file name too long, ...
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
