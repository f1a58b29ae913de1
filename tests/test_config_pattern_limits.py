"""Hostile and mistaken layout patterns (hybridseq.config.pattern): each is refused quickly with a
ConfigError naming the file, the key and the column with a caret under it, both from the parser
and through `hybridseq show` (exit status 2, no traceback). Valid patterns at the limits still
parse."""
import io
import json
import os
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from hybridseq.config.loader import MAX_FILE_BYTES

from hybridseq.cli import main
from hybridseq.config.pattern import (MAX_COUNT_DIGITS, MAX_DEPTH, MAX_PATTERN_CHARS, MAX_SUBLAYERS,
                                      _show_char, parse_layout, parse_layout_list, parse_megatron)
from hybridseq.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SYMBOLS = {"M", "E", "A", "mamba"}
FAST = 2.0  # seconds; each hostile case takes milliseconds, this only catches hangs and blow-ups

# id -> (pattern, fragment of the message, 1-based column of the caret)
HOSTILE = {
    "5000 nested groups": ("(" * 5000 + "M" + ")" * 5000, f"groups nested more than {MAX_DEPTH} levels deep",
                           MAX_DEPTH + 1),
    "one group too deep": ("(" * (MAX_DEPTH + 1) + "M" + ")" * (MAX_DEPTH + 1), f"more than {MAX_DEPTH} levels",
                           MAX_DEPTH + 1),
    "5000-digit count": ("M*" + "9" * 5000, "repeat count 999", 3),
    "5000-digit count in a group": ("(M E)*" + "1" * 5000, "5000 digits", 7),
    "5000-digit negative count": ("M*-" + "9" * 5000, "repeat count must be >= 1, got -999", 3),
    "5000-digit decimal count": ("M*1." + "5" * 5000, "repeat count must be an integer, got '1.555", 3),
    "nested repeats": ("(((M*999999)*999999)*999999)", "repeat expands to 999999 sublayers", 5),
    "nested repeats, each small": ("(((M*99)*99)*99)", "repeat expands to 970299 sublayers", 13),
    "many repeats": ("M*9999 " * 14_000, f"layout has more than {MAX_SUBLAYERS} sublayers", 1),
    "superscript count": ("M*²", "non-ASCII digit '²' (U+00B2 SUPERSCRIPT TWO)", 3),
    "Arabic-Indic count": ("M*٣", "non-ASCII digit '٣' (U+0663 ARABIC-INDIC DIGIT THREE)", 3),
    "Arabic-Indic after a digit": ("(M E)*1٣", "non-ASCII digit '٣'", 8),
    "fullwidth count": ("M*３", "non-ASCII digit U+FF13 FULLWIDTH DIGIT THREE", 3),
    "Arabic-Indic digit alone": ("M ٣", "non-ASCII digit '٣'", 3),
    "non-ASCII letter": ("M é", "non-ASCII letter 'é' (U+00E9 LATIN SMALL LETTER E WITH ACUTE)", 3),
    "non-ASCII letter in a word": ("mambaé", "non-ASCII letter 'é'", 6),
    "Cyrillic look-alike": ("М E", "non-ASCII letter 'М' (U+041C CYRILLIC CAPITAL LETTER EM)", 1),
    "CJK letter": ("M 字", "non-ASCII letter U+5B57", 3),
    "terminal escape": ("M \x1b[2J", "unexpected character U+001B", 3),
    "zero-width space": ("M\u200bE", "unexpected character U+200B ZERO WIDTH SPACE", 2),
    "right-to-left override": ("M \u202eE", "unexpected character U+202E RIGHT-TO-LEFT OVERRIDE", 3),
    "line break after '*'": ("M*\nE", "'*' needs a repeat count", 3),
    "10 MB pattern": ("M" * 10_000_000, "pattern too long (10000000 characters)", MAX_PATTERN_CHARS + 1),
    "10 MB of spaces": (" " * 10_000_000, "pattern too long", MAX_PATTERN_CHARS + 1),
    "500 KB pattern": ("M" * 500_000, "pattern too long (500000 characters)", MAX_PATTERN_CHARS + 1),
    "one character too long": ("M" + " " * MAX_PATTERN_CHARS, "pattern too long", MAX_PATTERN_CHARS + 1),
    "100,000-letter word": ("x" * (MAX_PATTERN_CHARS - 1), "unknown symbol 'xxx", 1),
    "marks repeated (before)": ("(" + "|" * 90_000 + "M)*9999", "before the first block", 2),
    "marks repeated (empty stage)": ("(M" + "|" * 90_000 + ")*9999", "empty stage", 4),
}


def caret_under(message: str, pattern: str, column: int) -> None:
    """The message ends with the pattern line (whole, or a window with '...') and a caret line;
    the caret stands under the character at ``column`` (1-based) of ``pattern``."""
    lines = message.splitlines()
    assert len(lines) == 3, message[:2000]
    shown, caret = lines[1], lines[2]
    assert shown.startswith("  ") and caret.startswith("  ") and caret.strip() == "^", message[:2000]
    assert len(shown) <= 2 + 200, "a long pattern is shown as a window around the column"
    at = caret.index("^")
    assert shown[at] == _show_char(pattern[column - 1]), message
    if len(pattern) > 200:
        assert "..." in shown


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    try:
        return fn(*args, **kwargs), time.perf_counter() - start
    except BaseException as e:  # noqa: BLE001 - handed back to the caller with the time it took
        return e, time.perf_counter() - start


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_pattern(case):
    pattern, fragment, column = HOSTILE[case]
    err, seconds = timed(parse_layout, pattern, SYMBOLS, file="h.yaml")
    assert seconds < FAST, f"{case}: {seconds:.2f} s"
    assert type(err) is ConfigError, repr(err)[:500]
    msg = str(err)
    assert msg.startswith("h.yaml: key 'layout': "), msg[:500]
    assert fragment in msg.splitlines()[0], msg[:500]
    assert f" at column {column}" in msg.splitlines()[0], msg[:500]
    assert len(msg) < 1000, "a hostile pattern is not echoed whole"
    caret_under(msg, pattern, column)


# the same through a YAML file and the command line --------------------------------------------
def yaml_file(tmp_path: Path, layout) -> Path:
    """A layout file; the layout is written as JSON, which is YAML (escapes and all)."""
    path = tmp_path / "hostile.yaml"
    path.write_text("model: {d_model: 64}\n"
                    "blocks: {M: {kind: mamba}, E: {kind: moe, n_experts: 4}, A: {kind: attention, n_heads: 4},"
                    " mamba: {kind: mamba}}\n"
                    f"layout: {json.dumps(layout)}\n", encoding="utf-8")
    return path


def show(path: Path) -> tuple[int, str, float]:
    """`hybridseq show PATH` in this process: (exit status, stderr, seconds)."""
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        rc, seconds = timed(main, ["show", str(path)])
    return rc, err.getvalue(), seconds


@pytest.fixture(scope="module", autouse=True)
def _imports_done(tmp_path_factory):
    # the first `show` imports the accounting modules: keep that out of the timed calls
    show(yaml_file(tmp_path_factory.mktemp("warm"), "M Q"))


@pytest.mark.parametrize("case", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_pattern_through_show(tmp_path, case):
    pattern, fragment, column = HOSTILE[case]
    path = yaml_file(tmp_path, pattern)
    rc, err, seconds = show(path)
    assert seconds < FAST, f"{case}: {seconds:.2f} s"
    assert rc == 2, err[:500]
    assert "Traceback" not in err
    lines = err.splitlines()
    if os.path.getsize(path) > MAX_FILE_BYTES:  # the file itself is refused before parsing
        assert len(lines) == 1 and lines[0].startswith(f"error: {path}: is ") and "MiB" in lines[0], err[:500]
        return
    # one error line naming file, key and column; under it the pattern and the caret
    assert lines[0].startswith(f"error: {path}: key 'layout': "), err[:500]
    assert fragment in lines[0] and f" at column {column}" in lines[0], err[:500]
    caret_under("\n".join(lines), pattern, column)


@pytest.mark.parametrize("layout, key, fragment, column", [
    (["M E", "(" * 5000 + "M" + ")" * 5000], "layout[1]", "groups nested more than", MAX_DEPTH + 1),
    (["M", "E*٣"], "layout[1]", "non-ASCII digit", 3),
    (["M" + " " * 59_999, "E" + " " * 59_999], "layout[1]", "layout list too long", MAX_PATTERN_CHARS - 60_000 + 1),
    ({"megatron": "M-" * 5_000_000}, "layout.megatron", "pattern too long (10000000 characters)",
     MAX_PATTERN_CHARS + 1),
    ({"megatron": "M-" * 150_000}, "layout.megatron", "pattern too long (300000 characters)",
     MAX_PATTERN_CHARS + 1),
    ({"megatron": "M-\x1b*"}, "layout.megatron", "unexpected character U+001B in a Megatron pattern", 3),
])
def test_hostile_list_and_megatron_through_show(tmp_path, layout, key, fragment, column):
    path = yaml_file(tmp_path, layout)
    rc, err, seconds = show(path)
    assert seconds < FAST and rc == 2 and "Traceback" not in err, err[:500]
    lines = err.splitlines()
    if os.path.getsize(path) > MAX_FILE_BYTES:  # the file itself is refused before parsing
        assert len(lines) == 1 and "MiB" in lines[0], err[:500]
        return
    assert lines[0].startswith(f"error: {tmp_path / 'hostile.yaml'}: key '{key}': "), err[:500]
    assert fragment in lines[0] and f" at column {column}" in lines[0], err[:500]
    element = layout["megatron"] if isinstance(layout, dict) else layout[int(key[-2])]
    caret_under("\n".join(lines), element, column)


def test_exit_status_of_the_process(tmp_path):
    # `python -m hybridseq show` itself: status 2 and the error lines, no RecursionError
    path = yaml_file(tmp_path, "(" * 5000 + "M" + ")" * 5000)
    r = subprocess.run([sys.executable, "-m", "hybridseq", "show", str(path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.startswith(f"error: {path}: key 'layout': groups nested more than {MAX_DEPTH} levels deep")


# limits are limits: what is within them still parses ---------------------------------------------
def test_depth_limit_itself_is_allowed():
    pattern = "(" * MAX_DEPTH + "M E" + ")" * MAX_DEPTH
    assert parse_layout(pattern, SYMBOLS) == (["M", "E"], [0])


def test_deep_nested_repeats_expand_like_before():
    # 12 nested doublings of 2 sublayers: 8192 sublayers, a stage mark inside each copy
    pattern = "(" * 12 + "M|E" + ")*2" * 12
    stack, starts = parse_layout(pattern, SYMBOLS)
    assert stack == ["M", "E"] * 2 ** 12
    assert starts == [0] + list(range(1, 2 ** 13, 2))


def test_length_limit_itself_is_allowed():
    pattern = "M" + " " * (MAX_PATTERN_CHARS - 1)
    assert parse_layout(pattern, SYMBOLS) == (["M"], [0])
    assert parse_megatron("M" + " " * (MAX_PATTERN_CHARS - 1)) == (["M"], [0])


def test_list_elements_share_the_length_limit():
    half = MAX_PATTERN_CHARS // 2
    assert parse_layout_list(["M" + " " * (half - 1), "E" + " " * (half - 1)], SYMBOLS) == (["M", "E"], [0])
    with pytest.raises(ConfigError, match=r"key 'layout\[2\]': layout list too long .* at column 1 "):
        parse_layout_list(["M" + " " * (half - 1), "E" + " " * (half - 1), "A"], SYMBOLS)


@pytest.mark.parametrize("pattern, stack", [
    (f"M*{MAX_SUBLAYERS}", ["M"] * MAX_SUBLAYERS),
    ("M*" + "0" * 5000 + "3", ["M"] * 3),  # leading zeros are not significant digits
    ("M*+2", ["M"] * 2),
    ("M*000000002 E", ["M", "M", "E"]),
])
def test_counts_within_the_limits(pattern, stack):
    assert parse_layout(pattern, SYMBOLS) == (stack, [0])


def test_count_digit_limit():
    largest = "9" * MAX_COUNT_DIGITS  # converted, then refused by the expansion check
    with pytest.raises(ConfigError, match=f"repeat expands to {largest} sublayers"):
        parse_layout(f"M*{largest}", SYMBOLS)
    with pytest.raises(ConfigError, match=f"{MAX_COUNT_DIGITS + 1} digits"):
        parse_layout(f"M*1{largest}", SYMBOLS)


def test_a_later_syntax_error_is_still_reported_first():
    # the expansion is checked before it is made, but reported after the whole pattern parsed
    with pytest.raises(ConfigError, match="unknown symbol 'Q' at column 15"):
        parse_layout("((M*999)*999) Q", SYMBOLS)


def test_odd_symbol_names_print_on_one_line():
    with pytest.raises(ConfigError) as info:
        parse_layout("Q", {"M", "M\n"})
    assert "(defined: M, 'M\\n')" in str(info.value).splitlines()[0]
