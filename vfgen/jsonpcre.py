"""PCRE patterns that find the top-level "model" member of a JSON request body, for nginx `map`.

nginx (stock, PCRE2) can only look at the raw body with regexes, so the body is
parsed by one anchored pattern: `\\A{` then the top-level members, each value
skipped whole by a recursive subpattern, until the member whose key is "model"
(spelled with or without \\u escapes). Its raw string value is captured; the
members after it are skipped the same way up to the closing `}` and `\\z`, so a
"model" key inside a nested object never counts, and a second top-level one
makes the pattern fail.

Why it stays linear (measured in docs/routing.md and bench/json_routing.py):
- every quantifier is possessive and every alternation atomic, and each
  alternative starts with a different character, so nothing is ever retried;
- strings are inlined, not called as a subroutine: PCRE2 checks each
  subroutine call against the enclosing calls of the same group, which walks
  back through every enclosing level when the group does not nest (strings
  never do) and made deep bodies quadratic (seen: 8000 levels took 3.3 s);
- `(*LIMIT_HEAP=...)` bounds the memory, and so the nesting depth, of one
  match; past it (or past PCRE2's match limit, about 3.5 million array
  elements) pcre2_match fails, nginx logs it at `alert` level, and the map
  falls to its default: the "unreadable" answer, never a model.

The grammar is laxer than JSON where that cannot change which member is the
top-level "model" of a valid document: numbers and literals are any run of
`[-+.0-9A-Za-z]`, brackets only have to balance, not pair, and `\\s` is PCRE's
whitespace. An invalid body may therefore be routed, and its backend rejects it.
"""

from __future__ import annotations

from dataclasses import dataclass

# Memory one match may use, in KiB. It allows 3277 (arrays and objects in turn) to
# 5241 (arrays only) levels of nesting, measured with libpcre2-8 10.42: more than
# Python's json, and so vLLM, reads (it stops just short of 1000).
HEAP_LIMIT_KIB = 4096

_W = r"\s*+"
# A JSON string, escapes included, possessive so nothing is read twice; "unrolled"
# (plain run, then escape + plain run), so one escape is one step of the match
# limit: a 30 MB document of CJK text escaped by json.dumps (5 M \uXXXX) fits.
_STRING = r'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
# The key "model", each letter raw or as \u00XX in either hex case.
_MODEL_KEY = '"' + "".join(
    "(?:" + c + "|" + "\\\\u00" + "".join(f"[{h}{h.upper()}]" if h.isalpha() else h for h in f"{ord(c):02x}") + ")"
    for c in "model"
) + '"'
_VALUE = "(?&v)"
_MEMBER = _STRING + _W + ":" + _W + _VALUE
# One JSON value and the whitespace after it, as group `v` (the only recursion).
_DEFINE = (
    "(?(DEFINE)(?<v>(?>"
    + _STRING
    # An array of numbers and literals (token ids) in one step of the match limit,
    # instead of several per element: a prompt of millions of ids fits.
    + r"|\[[-+.0-9A-Za-z\s,]*+\]"
    + r"|[\[{]" + _W + "(?:(?:" + _STRING + _W + ":" + _W + ")?+" + _VALUE
    + "(?:," + _W + "(?:" + _STRING + _W + ":" + _W + ")?+" + _VALUE + ")*+)?+[\\]}]"
    + r"|[-+.0-9A-Za-z]++)" + _W + "))"
)
_OPEN = r"\A" + _W + r"\{" + _W
_OTHER_MEMBERS_BEFORE = "(?:(?!" + _MODEL_KEY + ")" + _MEMBER + "," + _W + ")*+"
_OTHER_MEMBERS_AFTER = "(?:," + _W + "(?!" + _MODEL_KEY + ")" + _MEMBER + ")*+"
_CLOSE = r"\}" + _W + r"\z"


@dataclass(frozen=True)
class BodyPatterns:
    """The three patterns of the body map, tried in this order."""

    model: str  # exactly one top-level "model" with a string value: captures its raw content
    model_key: str  # a top-level "model" key at all (then the body is refused as ambiguous)
    no_model: str  # a whole JSON object with no top-level "model"


def body_patterns(capture: str, heap_limit_kib: int = HEAP_LIMIT_KIB) -> BodyPatterns:
    """Patterns for one deployment; `capture` names the group that holds the model's raw string."""
    limit = f"(*LIMIT_HEAP={heap_limit_kib})"
    start = limit + _DEFINE + _OPEN
    return BodyPatterns(
        model=(start + _OTHER_MEMBERS_BEFORE + _MODEL_KEY + _W + ":" + _W
               + f'"(?<{capture}>[^"\\\\]*+(?:\\\\.[^"\\\\]*+)*+)"' + _W + _OTHER_MEMBERS_AFTER + _CLOSE),
        model_key=start + _OTHER_MEMBERS_BEFORE + _MODEL_KEY,
        no_model=start + "(?:" + _MEMBER + "(?:," + _W + _MEMBER + ")*+)?+" + _CLOSE,
    )
