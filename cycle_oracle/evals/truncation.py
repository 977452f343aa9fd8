"""What survives truncation: a description cut to its first n tokens, and with its quotes banned.

Retrieval scores each description again after these rewrites (same encoder, same v):

- `truncated_<n>`: the first n tokens of the description (the oracle's tokenizer, no special
  tokens), for n in `eval.truncation_tokens` (4, 8, 16, 32); a description of at most n tokens
  is unchanged. Read as a curve, top-1 / FVE against n ("all" = the whole description): where the
  information sits (a quote of the source tokens up front carries it in the first few tokens);
- `quote_banned`: every quoted span removed, `It reads: "..."`.` (the warmup's quote format,
  `data/description.quoted_tail`) and any other `"..."` or `“...”` span with its quotes: what
  the description says beyond copying the source text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from cycle_oracle.data.description import split_quoted_description

_QUOTED = re.compile(r'"[^"]*"|“[^”]*”')


def truncate_tokens(texts: Sequence[str], n: int, tokenize: Callable[[str], list[int]], detokenize: Callable[[Sequence[int]], str]) -> list[str]:
    """Each text cut to its first n tokens (texts of at most n tokens unchanged)."""
    if n < 1:
        raise ValueError(f"truncation needs n >= 1 tokens, got {n}")
    out = []
    for t in texts:
        ids = tokenize(t)
        out.append(t if len(ids) <= n else detokenize(ids[:n]).strip())
    return out


def ban_quotes(text: str) -> str:
    """The text with its quoted spans removed, whitespace collapsed: the leading `It reads: "...".`
    as the warmup's own parser splits it (`data/description.split_quoted_description`: up to the
    first `".`, so a quote holding quote marks goes whole), then any other quoted span."""
    _, rest = split_quoted_description(text or "")
    return " ".join(_QUOTED.sub(" ", rest).split())


def token_lengths(texts: Sequence[str], tokenize: Callable[[str], list[int]]) -> list[int]:
    return [len(tokenize(t)) for t in texts]
