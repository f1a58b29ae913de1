"""The layout pattern grammar: a pattern string -> the stack of block symbols and stage starts.

Grammar (whitespace is free between tokens)::

    pattern  := item*
    item     := (symbol | '(' item+ ')') ('*' COUNT)?  |  '|'
    COUNT    := integer >= 1

- A symbol is a key of ``blocks``: letters, digits and '_', starting with a letter or '_'.
  Single-character symbols may touch (``"MEME"``); longer names are separated by whitespace
  (``"mamba moe mamba"``). A run of letters that is not a symbol is split into single
  characters when every character is a single-character symbol; otherwise it is an error.
- ``*N`` repeats the symbol or group right before it N times; groups nest.
- ``|`` ends a pipeline stage: the next sublayer begins a new stage. It may not open or close
  the layout, and two marks may not touch (an empty stage).

Result: ``stack`` (one symbol per sublayer) and ``stage_starts`` (sublayer indices where the
stages begin; always ``[0, ...]``).

Two other forms (``parse_layout_list``, ``parse_megatron``): a list of pattern strings that
are concatenated, and a Megatron-LM hybrid pattern (``"M-M*-ME"``: M mamba, * attention,
- mlp, E moe; ``|`` a stage mark).

Every error is a ``ConfigError`` naming the file and key, with the column (1-based) and a
caret under the offending character. These are pure functions over strings: no OmegaConf.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

from ..errors import ConfigError
from .schema import MEGATRON_SYMBOLS

MAX_SUBLAYERS = 10_000  # a layout longer than this is surely a typo in a repeat count


# ----------------------------------------------------------------------------------------------
# syntax tree
# ----------------------------------------------------------------------------------------------
@dataclass
class _Symbol:
    name: str
    col: int  # 0-based column of the symbol in the pattern


@dataclass
class _Group:
    items: list
    col: int  # column of '('


@dataclass
class _Repeat:
    item: Union[_Symbol, _Group]
    count: int
    col: int  # column of '*'


@dataclass
class _StageMark:
    col: int


class _PatternError(Exception):
    """Internal: what is wrong, the 0-based column, and an optional hint; wrapped into a
    ConfigError (with the pattern and a caret) by the public functions."""

    def __init__(self, what: str, col: int, hint: str | None = None):
        super().__init__(what)
        self.what, self.col, self.hint = what, col, hint


def did_you_mean(word: str, options: Iterable[str]) -> str | None:
    """The closest option to ``word`` (case-insensitive match first, then difflib), or None."""
    options = [str(o) for o in options]
    for o in options:
        if o.lower() == str(word).lower() and o != word:
            return o
    close = difflib.get_close_matches(str(word), options, n=1, cutoff=0.6)
    return close[0] if close else None


def _show_line(pattern: str) -> str:
    """The pattern on one line, one character per column (tabs/newlines become spaces)."""
    return "".join(" " if c in "\t\r\n" else c for c in pattern)


def _to_config_error(err: _PatternError, pattern: str, file, key: str) -> ConfigError:
    hint = f" ({err.hint})" if err.hint else ""
    caret = " " * err.col + "^"
    message = f"{err.what} at column {err.col + 1}{hint}\n  {_show_line(pattern)}\n  {caret}"
    return ConfigError(message, file=file, key=key)


# ----------------------------------------------------------------------------------------------
# parsing
# ----------------------------------------------------------------------------------------------
def _defined(symbols: Iterable[str]) -> str:
    names = sorted(symbols)
    return "defined: " + (", ".join(names) if names else "none")


def _resolve_word(word: str, col: int, symbols: set[str]) -> list[_Symbol]:
    """A run of identifier characters -> one symbol, or several touching single-char symbols."""
    if word in symbols:
        return [_Symbol(word, col)]
    if len(word) > 1 and all(c in symbols for c in word):
        return [_Symbol(c, col + i) for i, c in enumerate(word)]
    suggestion = did_you_mean(word, symbols)
    if suggestion is None and len(word) > 1 and any(c in symbols for c in word):
        # touching letters with one unknown among them: point at that letter
        i = next(i for i, c in enumerate(word) if c not in symbols)
        char_hint = did_you_mean(word[i], symbols)
        hint = _defined(symbols) + (f"; did you mean '{char_hint}'?" if char_hint else "")
        raise _PatternError(f"unknown symbol '{word[i]}' in '{word}'", col + i, hint)
    hint = (f"did you mean '{suggestion}'? " if suggestion else "") + _defined(symbols)
    if len(word) > 1 and suggestion is None:
        hint += "; names longer than one character are separated by spaces"
    raise _PatternError(f"unknown symbol '{word}'", col, hint)


def _is_word_start(c: str) -> bool:
    return c.isalpha() or c == "_"


def _is_word_char(c: str) -> bool:
    return c.isalnum() or c == "_"


class _Parser:
    def __init__(self, pattern: str, symbols: set[str]):
        self.p = pattern
        self.n = len(pattern)
        self.symbols = symbols

    def parse(self) -> list:
        items, i = self._items(0, None)
        return items

    def _items(self, i: int, open_col: int | None) -> tuple[list, int]:
        p, items = self.p, []
        while i < self.n:
            c = p[i]
            if c.isspace():
                i += 1
            elif c == "(":
                sub, j = self._items(i + 1, i)
                if not any(not isinstance(s, _StageMark) for s in sub):
                    raise _PatternError("empty group '()'", i, "a group holds at least one symbol")
                items.append(_Group(sub, i))
                i = j
            elif c == ")":
                if open_col is None:
                    raise _PatternError("unmatched ')'", i, "no '(' before it")
                return items, i + 1
            elif c == "*":
                i = self._repeat(items, i)
            elif c == "|":
                items.append(_StageMark(i))
                i += 1
            elif _is_word_start(c):
                j = i
                while j < self.n and _is_word_char(p[j]):
                    j += 1
                items.extend(_resolve_word(p[i:j], i, self.symbols))
                i = j
            elif c.isdigit():
                raise _PatternError(f"unexpected number '{c}'", i, "a repeat count needs '*' before it, as in 'M*4'")
            else:
                raise _PatternError(
                    f"unexpected character '{c}'", i,
                    "allowed: symbols, spaces, '(', ')', '*N', '|'"
                    + ("; Megatron patterns go in layout: {megatron: ...}" if c in "-*" else ""),
                )
        if open_col is not None:
            raise _PatternError("unmatched '('", open_col, "no ')' closes it")
        return items, i

    def _repeat(self, items: list, star: int) -> int:
        """Parse ``*N`` at ``star``; wrap the last item; return the index after N."""
        if not items or isinstance(items[-1], _StageMark):
            raise _PatternError("'*' has nothing to repeat", star, "write a symbol or a group before it, as in '(M E)*4'")
        if isinstance(items[-1], _Repeat):
            raise _PatternError("a repeat cannot follow a repeat", star, "group it: '(M*2)*3'")
        j = star + 1
        while j < self.n and self.p[j] in " \t":
            j += 1
        k = j + 1 if j < self.n and self.p[j] in "+-" else j
        while k < self.n and self.p[k].isdigit():
            k += 1
        text = self.p[j:k]
        if not text or text in "+-":
            at = j if j < self.n else star
            got = f"got '{self.p[j]}'" if j < self.n else "got the end of the pattern"
            raise _PatternError("'*' needs a repeat count", at, f"an integer >= 1; {got}")
        if k < self.n and self.p[k] == ".":
            end = k + 1
            while end < self.n and self.p[end].isdigit():
                end += 1
            raise _PatternError(f"repeat count must be an integer, got '{self.p[j:end]}'", j, "an integer >= 1")
        count = int(text)
        if count < 1:
            raise _PatternError(f"repeat count must be >= 1, got {text}", j, "an integer >= 1")
        items[-1] = _Repeat(items[-1], count, star)
        return k


# ----------------------------------------------------------------------------------------------
# expansion
# ----------------------------------------------------------------------------------------------
def _length(items: Sequence) -> int:
    total = 0
    for it in items:
        if isinstance(it, _Symbol):
            total += 1
        elif isinstance(it, _Group):
            total += _length(it.items)
        elif isinstance(it, _Repeat):
            inner = _length([it.item])
            if inner * it.count > MAX_SUBLAYERS:
                raise _PatternError(
                    f"repeat expands to {inner * it.count} sublayers", it.col, f"at most {MAX_SUBLAYERS}")
            total += inner * it.count
    return total


def _expand(items: Sequence, out: list) -> None:
    """Append symbols (str) and stage marks (_StageMark) of ``items`` to ``out``, in order."""
    for it in items:
        if isinstance(it, _Symbol):
            out.append(it.name)
        elif isinstance(it, _StageMark):
            out.append(it)
        elif isinstance(it, _Group):
            _expand(it.items, out)
        else:
            for _ in range(it.count):
                _expand([it.item], out)


def _parse_events(pattern: str, symbols: set[str]) -> list:
    """Pattern -> flat list of symbols (str) and _StageMark, with the length checked."""
    items = _Parser(pattern, symbols).parse()
    if _length(items) > MAX_SUBLAYERS:
        raise _PatternError(f"layout has more than {MAX_SUBLAYERS} sublayers", 0, "check the repeat counts")
    events: list = []
    _expand(items, events)
    return events


def _split_stages(events: list, where) -> tuple[list[str], list[int]]:
    """Flat events -> (stack, stage_starts). ``where(mark)`` gives the error context
    (a callable raising for a bad mark) as ``where(mark, what, hint)``."""
    stack: list[str] = []
    starts = [0]
    last_mark = None
    for ev in events:
        if isinstance(ev, _StageMark):
            if not stack:
                where(ev, "stage mark '|' before the first block", "'|' goes between two stages")
            if starts[-1] == len(stack):
                where(ev, "empty stage: two '|' with no block between them", "remove one '|'")
            starts.append(len(stack))
            last_mark = ev
        else:
            stack.append(ev)
    if last_mark is not None and starts[-1] == len(stack):
        where(last_mark, "stage mark '|' after the last block", "'|' goes between two stages")
    return stack, starts


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------
def parse_layout(pattern: str, symbols: Iterable[str], *, file=None, key: str = "layout") -> tuple[list[str], list[int]]:
    """Parse one pattern string over the block ``symbols``: returns ``(stack, stage_starts)``."""
    symbols = set(symbols)
    if not isinstance(pattern, str):
        raise ConfigError(f"expected a pattern string, got {type(pattern).__name__}", file=file, key=key)
    if not pattern.strip():
        raise ConfigError("the layout is empty (write a pattern such as 'M*4' or '(M E)*2')", file=file, key=key)
    try:
        events = _parse_events(pattern, symbols)
        if not any(isinstance(e, str) for e in events):
            raise _PatternError("the layout has no blocks", 0, "write at least one symbol")

        def where(mark, what, hint):
            raise _PatternError(what, mark.col, hint)

        return _split_stages(events, where)
    except _PatternError as err:
        raise _to_config_error(err, pattern, file, key) from None


def parse_layout_list(patterns: Sequence, symbols: Iterable[str], *, file=None, key: str = "layout") -> tuple[list[str], list[int]]:
    """The YAML-list form: each element is a pattern; the stacks are concatenated (a lone
    ``"|"`` element, or marks inside elements, split stages). Errors name ``layout[i]``."""
    symbols = set(symbols)
    if len(patterns) == 0:
        raise ConfigError("the layout is an empty list (give at least one pattern)", file=file, key=key)
    events: list = []
    owner: dict[int, tuple[int, str]] = {}  # id(mark) -> (element index, element)
    for i, element in enumerate(patterns):
        ekey = f"{key}[{i}]"
        if not isinstance(element, str):
            raise ConfigError(
                f"expected a pattern string, got {type(element).__name__} {element!r}",
                file=file, key=ekey) from None
        if not element.strip():
            raise ConfigError("empty pattern in the layout list", file=file, key=ekey)
        try:
            evs = _parse_events(element, symbols)
        except _PatternError as err:
            raise _to_config_error(err, element, file, ekey) from None
        for ev in evs:
            if isinstance(ev, _StageMark):
                owner[id(ev)] = (i, element)
        events.extend(evs)
    if sum(isinstance(e, str) for e in events) > MAX_SUBLAYERS:
        raise ConfigError(f"the layout has more than {MAX_SUBLAYERS} sublayers", file=file, key=key)

    def where(mark, what, hint):
        i, element = owner[id(mark)]
        raise _to_config_error(_PatternError(what, mark.col, hint), element, file, f"{key}[{i}]")

    return _split_stages(events, where)


def parse_megatron(pattern: str, *, file=None, key: str = "layout.megatron") -> tuple[list[str], list[int]]:
    """A Megatron-LM hybrid pattern: one character per sublayer (``M`` mamba, ``*`` attention,
    ``-`` mlp, ``E`` moe, as in ``MEGATRON_SYMBOLS``), ``|`` a stage mark, spaces ignored.
    Returns ``(stack, stage_starts)`` with our symbols (M, A, F, E)."""
    if not isinstance(pattern, str):
        raise ConfigError(f"expected a Megatron pattern string, got {type(pattern).__name__}", file=file, key=key)
    if not pattern.strip():
        raise ConfigError("the Megatron pattern is empty (e.g. 'M-M*-ME')", file=file, key=key)
    allowed = ", ".join(f"'{c}' {MEGATRON_SYMBOLS[c][1]}" for c in MEGATRON_SYMBOLS) + ", '|' stage mark"
    try:
        events: list = []
        for col, c in enumerate(pattern):
            if c.isspace():
                continue
            if c == "|":
                events.append(_StageMark(col))
            elif c in MEGATRON_SYMBOLS:
                events.append(MEGATRON_SYMBOLS[c][0])
            else:
                raise _PatternError(f"unexpected character '{c}' in a Megatron pattern", col, "allowed: " + allowed)
        if len(events) > MAX_SUBLAYERS:
            raise _PatternError(f"layout has more than {MAX_SUBLAYERS} sublayers", 0, None)

        def where(mark, what, hint):
            raise _PatternError(what, mark.col, hint)

        return _split_stages(events, where)
    except _PatternError as err:
        raise _to_config_error(err, pattern, file, key) from None


def megatron_symbols_used(pattern: str) -> list[tuple[str, str]]:
    """``(symbol, kind)`` for each Megatron character used in ``pattern``, in first-use order
    (unknown characters are skipped; ``parse_megatron`` reports them)."""
    seen: list[tuple[str, str]] = []
    for c in pattern:
        if c in MEGATRON_SYMBOLS and MEGATRON_SYMBOLS[c] not in seen:
            seen.append(MEGATRON_SYMBOLS[c])
    return seen


def format_stack(stack: Sequence[str], stage_starts: Sequence[int] = (0,)) -> str:
    """A pattern that parses back to ``stack``/``stage_starts``: symbols separated by spaces,
    ``|`` at stage starts, runs of one symbol written ``S*N``."""
    parts: list[str] = []
    starts = set(stage_starts) - {0}
    i = 0
    while i < len(stack):
        if i in starts:
            parts.append("|")
        j = i + 1
        while j < len(stack) and stack[j] == stack[i] and j not in starts:
            j += 1
        parts.append(stack[i] if j - i == 1 else f"{stack[i]}*{j - i}")
        i = j
    return " ".join(parts)
