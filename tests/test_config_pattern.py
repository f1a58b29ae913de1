"""The layout pattern grammar (hybridseq.config.pattern): valid patterns and malformed ones, each
with its message, column and caret."""
import pytest

from hybridseq.config.pattern import (MAX_SUBLAYERS, format_stack, parse_layout, parse_layout_list,
                                      parse_megatron)
from hybridseq.errors import ConfigError

SYMBOLS = {"M", "E", "A", "F", "mamba", "moe", "attn2"}


def caret_column(message: str) -> int:
    """1-based column of the caret in an error message (the line holding only spaces and '^')."""
    lines = message.splitlines()
    carets = [ln for ln in lines if ln.strip() == "^"]
    assert len(carets) == 1, message
    # the pattern line is printed right above the caret line, both indented by two spaces
    pattern_line = lines[lines.index(carets[0]) - 1]
    assert pattern_line.startswith("  "), message
    return carets[0].index("^") - 2 + 1


@pytest.mark.parametrize(
    "pattern, stack, starts",
    [
        ("M", ["M"], [0]),
        ("MEME", ["M", "E", "M", "E"], [0]),
        ("M E M E", ["M", "E", "M", "E"], [0]),
        ("mamba moe mamba", ["mamba", "moe", "mamba"], [0]),
        ("mamba MEA attn2", ["mamba", "M", "E", "A", "attn2"], [0]),
        ("M*3", ["M"] * 3, [0]),
        ("M *3", ["M"] * 3, [0]),
        ("ME*2", ["M", "E", "E"], [0]),  # the repeat binds to the symbol before it
        ("(M E)*2", ["M", "E"] * 2, [0]),
        ("(ME)*2 A", ["M", "E", "M", "E", "A"], [0]),
        ("((M E)*2 A)*2", (["M", "E"] * 2 + ["A"]) * 2, [0]),
        ("(mamba (moe)*2)*2", ["mamba", "moe", "moe"] * 2, [0]),
        ("M M | E E", ["M", "M", "E", "E"], [0, 2]),
        ("M|E|A", ["M", "E", "A"], [0, 1, 2]),
        ("(M M|)*2 E", ["M", "M", "M", "M", "E"], [0, 2, 4]),
        ("(M E)*2 | (A F)*2", ["M", "E", "M", "E", "A", "F", "A", "F"], [0, 4]),
        ("  M\n  E\tA ", ["M", "E", "A"], [0]),
        ("M*10", ["M"] * 10, [0]),
    ],
)
def test_valid_patterns(pattern, stack, starts):
    assert parse_layout(pattern, SYMBOLS) == (stack, starts)


def test_whole_name_preferred_over_letters():
    # "ME" is itself a symbol here, so it is not split into M and E
    assert parse_layout("ME M E", {"M", "E", "ME"}) == (["ME", "M", "E"], [0])


# (pattern, expected fragment of the message, 1-based column of the caret)
MALFORMED = [
    ("(M E M Q)*2", "unknown symbol 'Q'", 8),
    ("MEQ", "unknown symbol 'Q' in 'MEQ'", 3),
    ("mamab moe", "did you mean 'mamba'?", 1),
    ("M m", "did you mean 'M'?", 3),
    ("xyz", "unknown symbol 'xyz'", 1),
    ("(M E", "unmatched '('", 1),
    ("M (E (A)*2", "unmatched '('", 3),
    ("M E)", "unmatched ')'", 4),
    ("(M))", "unmatched ')'", 4),
    ("M*0", "repeat count must be >= 1, got 0", 3),
    ("M*-1", "repeat count must be >= 1, got -1", 3),
    ("M*", "'*' needs a repeat count", 2),
    ("M*x", "'*' needs a repeat count", 3),
    ("M* E", "'*' needs a repeat count", 4),
    ("M*2.5", "must be an integer, got '2.5'", 3),
    ("*2 M", "'*' has nothing to repeat", 1),
    ("M | *2", "'*' has nothing to repeat", 5),
    ("(*3 M)", "'*' has nothing to repeat", 2),
    ("M*2*3", "a repeat cannot follow a repeat", 4),
    ("()*2 M", "empty group", 1),
    ("M ( ) E", "empty group", 3),
    ("| M E", "before the first block", 1),
    ("M E |", "after the last block", 5),
    ("M || E", "empty stage", 4),
    ("(|M)*2", "before the first block", 2),
    ("(M|)*2", "after the last block", 3),
    ("M 2", "unexpected number '2'", 3),
    ("M, E", "unexpected character ','", 2),
    ("M-M*-ME", "Megatron patterns go in layout: {megatron", 2),
    ("M*100000", "repeat expands to 100000 sublayers", 2),
    ("((M E)*100)*100", "repeat expands to 20000 sublayers", 12),
]


@pytest.mark.parametrize("pattern, fragment, column", MALFORMED)
def test_malformed_patterns(pattern, fragment, column):
    with pytest.raises(ConfigError) as info:
        parse_layout(pattern, SYMBOLS, file="layouts/x.yaml")
    msg = str(info.value)
    assert msg.startswith("layouts/x.yaml: key 'layout': "), msg
    assert fragment in msg
    assert f"at column {column}" in msg
    assert caret_column(msg) == column
    assert f"\n  {pattern.replace(chr(9), ' ')}\n" in msg  # the pattern is shown above the caret
    assert info.value.key == "layout" and info.value.file == "layouts/x.yaml"


def test_unknown_symbol_lists_defined_symbols():
    with pytest.raises(ConfigError, match=r"defined: A, E, M\)"):
        parse_layout("(M E M Q)*2", {"A", "E", "M"})


def test_caret_after_newline_in_pattern():
    # a folded YAML string may hold newlines: each counts as one column, shown as a space
    with pytest.raises(ConfigError) as info:
        parse_layout("M\nQ", {"M"})
    assert caret_column(str(info.value)) == 3
    assert "\n  M Q\n" in str(info.value)


@pytest.mark.parametrize("pattern", ["", "   ", "\n"])
def test_empty_pattern(pattern):
    with pytest.raises(ConfigError, match="key 'layout': the layout is empty"):
        parse_layout(pattern, SYMBOLS)


def test_pattern_of_only_stage_marks():
    with pytest.raises(ConfigError, match="no blocks"):
        parse_layout("|", SYMBOLS)


def test_length_limit_counts_the_whole_pattern():
    half = MAX_SUBLAYERS // 2 + 1
    with pytest.raises(ConfigError, match="more than"):
        parse_layout(f"M*{half} E*{half}", SYMBOLS)


# ----------------------------------------------------------------------------------------------
# list form
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "patterns, stack, starts",
    [
        (["M", "E", "M", "E"], ["M", "E", "M", "E"], [0]),
        (["(M E)*2", "A"], ["M", "E", "M", "E", "A"], [0]),
        (["M E", "|", "A F"], ["M", "E", "A", "F"], [0, 2]),
        (["M E |", "A"], ["M", "E", "A"], [0, 2]),
        (["mamba", "MEME"], ["mamba", "M", "E", "M", "E"], [0]),
    ],
)
def test_list_form(patterns, stack, starts):
    assert parse_layout_list(patterns, SYMBOLS) == (stack, starts)


@pytest.mark.parametrize(
    "patterns, key, fragment, column",
    [
        (["M", "E", "Q"], "layout[2]", "unknown symbol 'Q'", 1),
        (["M", "(E A"], "layout[1]", "unmatched '('", 1),
        (["|", "M"], "layout[0]", "before the first block", 1),
        (["M", "|"], "layout[1]", "after the last block", 1),
        (["M |", "| E"], "layout[1]", "empty stage", 1),
        (["M", "E*0"], "layout[1]", "repeat count must be >= 1", 3),
    ],
)
def test_list_form_errors(patterns, key, fragment, column):
    with pytest.raises(ConfigError) as info:
        parse_layout_list(patterns, SYMBOLS, file="f.yaml")
    msg = str(info.value)
    assert msg.startswith(f"f.yaml: key '{key}': ") and fragment in msg
    assert caret_column(msg) == column


@pytest.mark.parametrize(
    "patterns, key, fragment",
    [
        ([], "layout", "empty list"),
        (["M", 3], "layout[1]", "expected a pattern string, got int"),
        (["M", ["E"]], "layout[1]", "expected a pattern string, got list"),
        (["M", " "], "layout[1]", "empty pattern"),
    ],
)
def test_list_form_element_errors(patterns, key, fragment):
    with pytest.raises(ConfigError) as info:
        parse_layout_list(patterns, SYMBOLS)
    assert str(info.value).startswith(f"key '{key}': ") and fragment in str(info.value)


# ----------------------------------------------------------------------------------------------
# Megatron form
# ----------------------------------------------------------------------------------------------
def test_megatron_pattern():
    assert parse_megatron("M-M*-ME") == (["M", "F", "M", "A", "F", "M", "E"], [0])
    assert parse_megatron("M-M*|-ME") == (["M", "F", "M", "A", "F", "M", "E"], [0, 4])
    assert parse_megatron("MM MM") == (["M"] * 4, [0])


@pytest.mark.parametrize(
    "pattern, fragment, column",
    [
        ("M-Mx", "unexpected character 'x' in a Megatron pattern", 4),
        ("M-(M)", "unexpected character '('", 3),
        ("|M-", "before the first block", 1),
        ("M-|", "after the last block", 3),
        ("M||-", "empty stage", 3),
    ],
)
def test_megatron_errors(pattern, fragment, column):
    with pytest.raises(ConfigError) as info:
        parse_megatron(pattern, file="n.yaml")
    msg = str(info.value)
    assert msg.startswith("n.yaml: key 'layout.megatron': ") and fragment in msg
    assert caret_column(msg) == column


# ----------------------------------------------------------------------------------------------
# format_stack
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "stack, starts",
    [(["M", "M", "E", "A", "A"], [0, 3]), (["mamba", "moe"] * 3, [0]), (["M"] * 5, [0, 2, 4])],
)
def test_format_stack_parses_back(stack, starts):
    text = format_stack(stack, starts)
    assert parse_layout(text, set(stack)) == (stack, starts)
