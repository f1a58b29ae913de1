"""The layout pattern grammar: a pattern string -> the stack of block symbols and stage starts.

Grammar (whitespace is free between tokens)::

    pattern  := item*
    item     := (symbol | '(' item+ ')') ('*' COUNT)?  |  '|'
    COUNT    := integer >= 1, in the ASCII digits 0-9

- A symbol is a key of ``blocks``: ASCII letters, digits and '_', starting with a letter or '_'.
  Single-character symbols may touch (``"MEME"``); longer names are separated by whitespace
  (``"mamba moe mamba"``). A run of letters that is not a symbol is split into single
  characters when every character is a single-character symbol; otherwise it is an error.
- ``*N`` repeats the symbol or group right before it N times; groups nest.
- ``|`` ends a pipeline stage: the next sublayer begins a new stage. It may not open or close
  the layout, and two marks may not touch (an empty stage).

Limits, so that hostile or mistaken input fails fast with a message instead of exhausting time,
memory or the Python stack: a pattern (or a layout list, all its patterns together) holds at
most ``MAX_PATTERN_CHARS`` characters, groups nest at most ``MAX_DEPTH`` levels, a repeat count
has at most ``MAX_COUNT_DIGITS`` significant digits, and the layout expands to at most
``MAX_SUBLAYERS`` sublayers; each repeat is checked before it is expanded.

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
import re
import reprlib
import string
import unicodedata
from dataclasses import dataclass
from typing import Iterable, Sequence

from ..errors import ConfigError
from .schema import MEGATRON_SYMBOLS

MAX_SUBLAYERS = 10_000  # a layout longer than this is surely a typo in a repeat count
MAX_PATTERN_CHARS = 100_000  # far beyond any real layout; bounds the parser's time and memory
MAX_DEPTH = 64  # nested groups; the parser keeps one frame per open '('
MAX_COUNT_DIGITS = 9  # significant digits of a repeat count: int() stays cheap, and any count
#                       above MAX_SUBLAYERS is refused by the expansion check anyway

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # a symbol name; ASCII only, as in blocks' keys
_WORD_START = frozenset(string.ascii_letters + "_")
_DIGITS = re.compile(r"[0-9]*")  # not \d and not str.isdigit(): those accept other scripts' digits
_ASCII_DIGITS = frozenset(string.digits)
_CONTROL_NAMES = {"\n": "LINE FEED", "\r": "CARRIAGE RETURN", "\t": "TAB"}  # unicodedata has no names for these
_SHOW_WHOLE = 200  # patterns up to this long are shown whole under an error ...
_SHOW_SIDE = 60  # ... longer ones as this many characters either side of the column


@dataclass
class _StageMark:
    col: int  # 0-based column of the '|' in the pattern


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


# ----------------------------------------------------------------------------------------------
# showing the pattern under an error
# ----------------------------------------------------------------------------------------------
def _show_char(c: str) -> str:
    """``c`` as it is shown on the pattern line: one terminal column, so the caret lines up.
    Whitespace becomes a space; control, format, combining and wide characters become '?'."""
    if c.isspace():
        return " "
    if c.isascii():
        return c if c.isprintable() else "?"
    if (not c.isprintable() or unicodedata.category(c) in ("Mn", "Me")
            or unicodedata.east_asian_width(c) in ("W", "F")):
        return "?"
    return c


def _describe_char(c: str) -> str:
    """``'c'`` for a printable ASCII character; otherwise its code point and name as well
    (only the code point when the character itself would not show)."""
    if c.isascii() and c.isprintable():
        return f"'{c}'"
    name = _CONTROL_NAMES.get(c) or unicodedata.name(c, None)
    code = f"U+{ord(c):04X}" + (f" {name}" if name else "")
    return f"'{c}' ({code})" if _show_char(c) == c else code


def _clip(text: str, limit: int = 60) -> str:
    """``text`` cut to ``limit`` characters for a message (a hostile pattern may be huge)."""
    return text if len(text) <= limit else text[:limit] + "..."


def _excerpt(pattern: str, col: int) -> tuple[str, int]:
    """The pattern line to show and the caret's offset in it: the whole pattern when it is short,
    else a window around ``col`` with '...' where it is cut."""
    col = max(0, min(col, len(pattern)))
    if len(pattern) <= _SHOW_WHOLE:
        start, end = 0, len(pattern)
    else:
        start, end = max(0, col - _SHOW_SIDE), min(len(pattern), col + _SHOW_SIDE + 1)
    lead = "..." if start > 0 else ""
    tail = "..." if end < len(pattern) else ""
    line = lead + "".join(_show_char(c) for c in pattern[start:end]) + tail
    return line, len(lead) + col - start


def _to_config_error(err: _PatternError, pattern: str, file, key: str) -> ConfigError:
    hint = f" ({err.hint})" if err.hint else ""
    line, caret = _excerpt(pattern, err.col)
    message = f"{err.what} at column {err.col + 1}{hint}\n  {line}\n  {' ' * caret}^"
    return ConfigError(message, file=file, key=key)


def _check_length(pattern: str, budget: int = MAX_PATTERN_CHARS,
                  tip: str = "write repeated runs as 'M*N' or '(M E)*N'") -> None:
    """Refuse a pattern longer than ``budget`` characters (what is left of MAX_PATTERN_CHARS),
    pointing at the first character beyond it. Done before anything else looks at the text."""
    if len(pattern) <= budget:
        return
    if budget == MAX_PATTERN_CHARS:
        raise _PatternError(f"pattern too long ({len(pattern)} characters)", budget,
                            f"at most {MAX_PATTERN_CHARS} characters; {tip}")
    raise _PatternError(f"layout list too long (more than {MAX_PATTERN_CHARS} characters in its patterns together)",
                        budget, f"{MAX_PATTERN_CHARS - budget} characters before this pattern; {tip}")


# ----------------------------------------------------------------------------------------------
# parsing
# ----------------------------------------------------------------------------------------------
def _defined(symbols: Iterable[str], limit: int = 40) -> str:
    # a name that would not print on one line is shown quoted, with its escapes
    names = [n if n.isprintable() else repr(n) for n in sorted(str(s) for s in symbols)]
    if len(names) > limit:  # keep the message readable when blocks has very many keys
        return f"defined: {', '.join(names[:limit])}, ... ({len(names)} in all)"
    return "defined: " + (", ".join(names) if names else "none")


def _resolve_word(word: str, col: int, symbols: set[str]) -> list[str]:
    """A run of identifier characters -> one symbol, or several touching single-char symbols."""
    if word in symbols:
        return [word]
    if len(word) > 1 and all(c in symbols for c in word):
        return list(word)
    suggestion = did_you_mean(word, symbols)
    if suggestion is None and len(word) > 1 and any(c in symbols for c in word):
        # touching letters with one unknown among them: point at that letter
        i = next(i for i, c in enumerate(word) if c not in symbols)
        char_hint = did_you_mean(word[i], symbols)
        hint = _defined(symbols) + (f"; did you mean '{char_hint}'?" if char_hint else "")
        raise _PatternError(f"unknown symbol '{word[i]}' in '{_clip(word)}'", col + i, hint)
    hint = (f"did you mean '{suggestion}'? " if suggestion else "") + _defined(symbols)
    if len(word) > 1 and suggestion is None:
        hint += "; names longer than one character are separated by spaces"
    raise _PatternError(f"unknown symbol '{_clip(word)}'", col, hint)


def _is_foreign_digit(c: str) -> bool:
    """A digit of another script ('٣', '３', '²'): str.isdigit() and int() accept these."""
    return not c.isascii() and c.isdigit()


def _foreign_digit_error(c: str, col: int) -> _PatternError:
    return _PatternError(f"non-ASCII digit {_describe_char(c)}", col,
                         "repeat counts are written with the ASCII digits 0-9, as in 'M*3'")


def _unexpected(c: str, col: int) -> _PatternError:
    """The error for a character that no rule of the grammar accepts."""
    if _is_foreign_digit(c):
        return _foreign_digit_error(c, col)
    if not c.isascii() and c.isalpha():
        return _PatternError(f"non-ASCII letter {_describe_char(c)}", col,
                             "symbol names are ASCII: letters A-Z and a-z, digits 0-9 and '_'")
    if c in _ASCII_DIGITS:
        return _PatternError(f"unexpected number '{c}'", col, "a repeat count needs '*' before it, as in 'M*4'")
    return _PatternError(
        f"unexpected character {_describe_char(c)}", col,
        "allowed: symbols, spaces, '(', ')', '*N', '|'"
        + ("; Megatron patterns go in layout: {megatron: ...}" if c in "-*" else ""),
    )


def _is_mark(ev) -> bool:
    return isinstance(ev, _StageMark)


# what the last item of a frame is: nothing to repeat yet, a stage mark, a symbol or group, or a
# repeat (which may not be repeated again)
_NONE, _MARK, _ITEM, _REPEATED = range(4)


class _Frame:
    """One open level of the parse: the top level, or a '(' not yet closed.

    ``events`` holds the expansion of the items parsed so far (symbols as str, '|' as
    _StageMark). It stops growing once the frame is ``doomed``: two marks touch in it, so the
    stage check fails at or before the second of them, and nothing after it can change the
    result; this bounds the events of repeated marks such as ``(|||M)*9999``."""

    __slots__ = ("open_col", "events", "length", "last", "last_start", "last_length", "doomed")

    def __init__(self, open_col: int | None):
        self.open_col = open_col  # column of '(' (None at the top level)
        self.events: list = []
        self.length = 0  # sublayers of the items so far (exact until a repeat is too long)
        self.last = _NONE
        self.last_start = 0  # where the last item's events begin in ``events``
        self.last_length = 0  # sublayers of the last item
        self.doomed = False

    def add(self, events: list, length: int, collect: bool) -> None:
        """Append a finished symbol or group (its ``events`` and ``length``)."""
        self.last, self.last_start, self.last_length = _ITEM, len(self.events), length
        self.length += length
        if not collect or self.doomed or not events:
            return
        if self.events and _is_mark(self.events[-1]) and _is_mark(events[0]):
            self.events.append(events[0])
            self.doomed = True
        else:
            self.events.extend(events)

    def add_mark(self, mark: _StageMark, collect: bool) -> None:
        self.last = _MARK
        if not collect or self.doomed:
            return
        if self.events and _is_mark(self.events[-1]):
            self.doomed = True
        self.events.append(mark)

    def repeat(self, count: int, collect: bool) -> None:
        """Repeat the last item ``count`` times (its length is checked by the caller first)."""
        self.length += self.last_length * (count - 1)
        self.last, self.last_length = _REPEATED, self.last_length * count
        if not collect or self.doomed or count == 1:
            return
        seg = self.events[self.last_start:]
        if not seg:
            return
        del self.events[self.last_start:]
        if _is_mark(seg[0]) and _is_mark(seg[-1]):
            # the copies' marks would touch: keep one copy and the mark that touches it
            self.events += seg + seg[:1]
            self.doomed = True
        else:
            self.events += seg * count


class _Parser:
    """Iterative: an explicit stack of frames, one per open '(' (at most MAX_DEPTH + 1)."""

    def __init__(self, pattern: str, symbols: set[str]):
        self.p = pattern
        self.n = len(pattern)
        self.symbols = symbols
        self.frames = [_Frame(None)]
        # The first repeat that expands past MAX_SUBLAYERS; raised once the whole pattern has
        # parsed, so a syntax error anywhere is still reported first.
        self.too_long: _PatternError | None = None
        # Events are collected until the layout is known to exceed MAX_SUBLAYERS (a frame's
        # length only adds to the total, at least once), so memory stays bounded.
        self.collect = True

    def parse(self) -> tuple[list, int]:
        """-> (events: symbols and _StageMark in order, number of sublayers)."""
        p, n, frames = self.p, self.n, self.frames
        i = 0
        while i < n:
            c = p[i]
            if c.isspace():
                i += 1
            elif c == "(":
                if len(frames) > MAX_DEPTH:
                    raise _PatternError(f"groups nested more than {MAX_DEPTH} levels deep", i,
                                        f"at most {MAX_DEPTH} levels of '(' inside one another")
                frames.append(_Frame(i))
                i += 1
            elif c == ")":
                if len(frames) == 1:
                    raise _PatternError("unmatched ')'", i, "no '(' before it")
                group = frames.pop()
                if group.length == 0:
                    raise _PatternError("empty group '()'", group.open_col, "a group holds at least one symbol")
                frames[-1].add(group.events, group.length, self.collect)
                if group.doomed:
                    frames[-1].doomed = True
                self._check(frames[-1])
                i += 1
            elif c == "*":
                i = self._repeat(i)
            elif c == "|":
                frames[-1].add_mark(_StageMark(i), self.collect)
                i += 1
            elif c in _WORD_START:
                word = _WORD.match(p, i).group()
                for name in _resolve_word(word, i, self.symbols):
                    frames[-1].add([name], 1, self.collect)
                self._check(frames[-1])
                i += len(word)
            else:
                raise _unexpected(c, i)
        if len(frames) > 1:
            raise _PatternError("unmatched '('", frames[-1].open_col, "no ')' closes it")
        if self.too_long is not None:
            raise self.too_long
        top = frames[0]
        if top.length > MAX_SUBLAYERS:
            raise _PatternError(f"layout has more than {MAX_SUBLAYERS} sublayers", 0, "check the repeat counts")
        return top.events, top.length

    def _check(self, frame: _Frame) -> None:
        if frame.length > MAX_SUBLAYERS:
            self.collect = False

    def _repeat(self, star: int) -> int:
        """Parse ``*N`` at ``star``; repeat the last item; return the index after N."""
        frame = self.frames[-1]
        if frame.last in (_NONE, _MARK):
            raise _PatternError("'*' has nothing to repeat", star, "write a symbol or a group before it, as in '(M E)*4'")
        if frame.last == _REPEATED:
            raise _PatternError("a repeat cannot follow a repeat", star, "group it: '(M*2)*3'")
        count, end = self._count(star)
        expanded = frame.last_length * count
        if expanded > MAX_SUBLAYERS and self.too_long is None:
            self.too_long = _PatternError(f"repeat expands to {expanded} sublayers", star, f"at most {MAX_SUBLAYERS}")
        if self.too_long is not None:
            # the layout is refused: lengths no longer matter, keep the numbers small
            self.collect = False
            count = min(count, MAX_SUBLAYERS + 1)
            frame.last_length = min(frame.last_length, MAX_SUBLAYERS + 1)
            frame.length = min(frame.length, MAX_SUBLAYERS + 1)
        if frame.length + frame.last_length * (count - 1) > MAX_SUBLAYERS:
            self.collect = False  # before expanding: the copies are never made
        frame.repeat(count, self.collect)
        return end

    def _count(self, star: int) -> tuple[int, int]:
        """The repeat count after the '*' at ``star``: ``(count, index after it)``. Only the
        ASCII digits 0-9 are read, and only up to MAX_COUNT_DIGITS significant ones are
        converted."""
        p, n = self.p, self.n
        j = star + 1
        while j < n and p[j] in " \t":
            j += 1
        k = j + 1 if j < n and p[j] in "+-" else j
        digits = _DIGITS.match(p, k).group()
        k += len(digits)
        if k < n and _is_foreign_digit(p[k]):
            raise _foreign_digit_error(p[k], k)
        text = p[j:k]
        if not digits:
            at = j if j < n else star
            got = f"got {_describe_char(p[j])}" if j < n else "got the end of the pattern"
            raise _PatternError("'*' needs a repeat count", at, f"an integer >= 1; {got}")
        if k < n and p[k] == ".":
            end = k + 1 + len(_DIGITS.match(p, k + 1).group())
            raise _PatternError(f"repeat count must be an integer, got '{_clip(p[j:end])}'", j, "an integer >= 1")
        significant = digits.lstrip("0")
        if not significant or text[0] == "-":
            raise _PatternError(f"repeat count must be >= 1, got {_clip(text)}", j, "an integer >= 1")
        if len(significant) > MAX_COUNT_DIGITS:
            raise _PatternError(f"repeat count {_clip(text)} is too large", j,
                                f"{len(significant)} digits; a layout holds at most {MAX_SUBLAYERS} sublayers")
        return int(significant), k


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
    try:
        _check_length(pattern)
        if not pattern.strip():
            raise ConfigError("the layout is empty (write a pattern such as 'M*4' or '(M E)*2')", file=file, key=key)
        events, length = _Parser(pattern, symbols).parse()
        if length == 0:
            raise _PatternError("the layout has no blocks", 0, "write at least one symbol")

        def where(mark, what, hint):
            raise _PatternError(what, mark.col, hint)

        return _split_stages(events, where)
    except _PatternError as err:
        raise _to_config_error(err, pattern, file, key) from None


def parse_layout_list(patterns: Sequence, symbols: Iterable[str], *, file=None, key: str = "layout") -> tuple[list[str], list[int]]:
    """The YAML-list form: each element is a pattern; the stacks are concatenated (a lone
    ``"|"`` element, or marks inside elements, split stages). Errors name ``layout[i]``.
    The elements share one budget of MAX_PATTERN_CHARS characters and MAX_SUBLAYERS sublayers."""
    symbols = set(symbols)
    if len(patterns) == 0:
        raise ConfigError("the layout is an empty list (give at least one pattern)", file=file, key=key)
    events: list = []
    owner: dict[int, tuple[int, str]] = {}  # id(mark) -> (element index, element)
    chars = 0  # characters of the elements so far
    total = 0  # sublayers of the elements so far
    for i, element in enumerate(patterns):
        ekey = f"{key}[{i}]"
        if not isinstance(element, str):
            raise ConfigError(
                f"expected a pattern string, got {type(element).__name__} {reprlib.repr(element)}",
                file=file, key=ekey) from None
        try:
            _check_length(element, MAX_PATTERN_CHARS - chars)
            if not element.strip():
                raise ConfigError("empty pattern in the layout list", file=file, key=ekey)
            evs, length = _Parser(element, symbols).parse()
        except _PatternError as err:
            raise _to_config_error(err, element, file, ekey) from None
        chars += len(element)
        total += length
        if total <= MAX_SUBLAYERS:  # beyond it the layout is refused below: stop collecting
            for ev in evs:
                if isinstance(ev, _StageMark):
                    owner[id(ev)] = (i, element)
            events.extend(evs)
    if total > MAX_SUBLAYERS:
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
    allowed = ", ".join(f"'{c}' {MEGATRON_SYMBOLS[c][1]}" for c in MEGATRON_SYMBOLS) + ", '|' stage mark"
    try:
        _check_length(pattern, tip="one character per sublayer")
        if not pattern.strip():
            raise ConfigError("the Megatron pattern is empty (e.g. 'M-M*-ME')", file=file, key=key)
        events: list = []
        for col, c in enumerate(pattern):
            if c.isspace():
                continue
            if c == "|":
                events.append(_StageMark(col))
            elif c in MEGATRON_SYMBOLS:
                events.append(MEGATRON_SYMBOLS[c][0])
            else:
                raise _PatternError(f"unexpected character {_describe_char(c)} in a Megatron pattern", col,
                                    "allowed: " + allowed)
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
    for c in dict.fromkeys(pattern):  # the distinct characters in first-use order, in C speed
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
