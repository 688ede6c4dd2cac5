"""Rule actions: the text right of a pattern, parsed once into a `RuleAction`.

The words are Postfix's access(5) ones (OK, DUNNO, REJECT, DEFER, 4NN/5NN text,
421/521, DISCARD, HOLD, PREPEND, WARN), plus `SCORE n SYMBOL`. Actions are parsed
when a table is loaded, so a typo is a `file:line` error at `spamgate check` or
reload time rather than a surprise in production. What an action means for the
mail (a verdict, a reply in Postfix's wording) is the rule checks' business:
`checks/engines/ruleverdict.py`.

`WARN` followed by a refusing action (`WARN REJECT text`) is the per-rule monitor
switch: the rule is logged and counted as what it would have done, and the lookup
goes on as if the line had not matched, so adding a rule this way never changes
what happens to mail.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

_REFUSING = ("REJECT", "DEFER", "DISCARD", "HOLD")
# Postfix actions people will try; named so the error says "not supported", not "typo".
_POSTFIX_ONLY = (
    "FILTER",
    "REDIRECT",
    "BCC",
    "INFO",
    "IGNORE",
    "REPLACE",
    "STRIP",
    "PASS",
    "DEFER_IF_REJECT",
    "DEFER_IF_PERMIT",
    "REJECT_UNAUTH_DESTINATION",
    "PERMIT",
)
_HEADER = re.compile(r"^([!-9;-~]+):[ \t]*(.*)$", re.S)
_SYMBOL = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


@dataclass(frozen=True, slots=True)
class RuleAction:
    """One parsed action. `text` may hold `$1`-style references until substituted."""

    word: str  # OK DUNNO REJECT DEFER REPLY DISCARD HOLD PREPEND WARN SCORE
    text: str = ""
    code: int | None = None  # REPLY: the 4NN/5NN/421/521 code
    monitor: bool = False  # WARN-prefixed: log and count, do not do
    score: float = 0.0
    symbol: str = ""
    source: str = ""  # the action as written, for `spamgate query`


def parse_action(text: str) -> RuleAction:
    """Parse the action part of a rule; ValueError with a readable reason."""
    source = text.strip()
    if not source:
        raise ValueError("no action after the pattern (expected 'pattern action [text]')")
    word, _, rest = source.partition(" ")
    if "\t" in word:
        word, _, more = word.partition("\t")
        rest = f"{more} {rest}".strip()
    rest = rest.strip()
    upper = word.upper()
    if upper == "WARN":
        inner, _, inner_rest = rest.partition(" ")
        if inner.upper() in _REFUSING or _is_reply_code(inner):
            action = _parse_plain(inner.upper() if not inner.isdigit() else inner, inner_rest)
            return replace(action, monitor=True, source=source)
        return RuleAction("WARN", rest, source=source)
    return replace(_parse_plain(upper, rest), source=source)


def _is_reply_code(word: str) -> bool:
    return len(word) == 3 and word.isdigit()


def _parse_plain(upper: str, rest: str) -> RuleAction:
    if upper.isdigit():
        if len(upper) != 3:
            # access(5): an all-numerical result means OK.
            if rest:
                raise ValueError(f"'{upper}' (all-numerical, meaning OK) takes no text")
            return RuleAction("OK")
        if upper[0] not in "45":
            raise ValueError(f"reply code {upper} is not 4NN or 5NN")
        return RuleAction("REPLY", rest, code=int(upper))
    if upper in ("OK", "DUNNO"):
        if rest:
            raise ValueError(f"{upper} takes no text (found '{rest}')")
        return RuleAction(upper)
    if upper in ("REJECT", "DEFER", "DISCARD", "HOLD"):
        return RuleAction(upper, rest)
    if upper == "PREPEND":
        if "$" not in rest.split(":", 1)[0] and not _HEADER.match(rest):
            raise ValueError("PREPEND needs a header: PREPEND X-Header-Name: value")
        return RuleAction("PREPEND", rest)
    if upper == "SCORE":
        parts = rest.split()
        if len(parts) != 2:
            raise ValueError("SCORE needs a number and a symbol name: SCORE 2.5 SYMBOL_NAME")
        try:
            score = float(parts[0])
        except ValueError:
            raise ValueError(f"SCORE: '{parts[0]}' is not a number") from None
        if score != score or score in (float("inf"), float("-inf")):
            raise ValueError(f"SCORE: '{parts[0]}' is not a finite number")
        if not _SYMBOL.match(parts[1]):
            raise ValueError(
                f"SCORE: '{parts[1]}' is not a symbol name (letters, digits and _, "
                "starting with a letter)"
            )
        return RuleAction("SCORE", score=score, symbol=parts[1])
    if upper in _POSTFIX_ONLY:
        raise ValueError(f"{upper} is a Postfix action that spamgate does not support")
    raise ValueError(
        f"unknown action '{upper}' (expected OK, DUNNO, REJECT, DEFER, 4NN/5NN text, "
        "DISCARD, HOLD, PREPEND, WARN or SCORE)"
    )
