"""Parser messages that say what to type: a space after '=', a pasted non-ASCII
character, quotes."""

from __future__ import annotations

import pytest

from graphopt.errors import PipelineParseError
from graphopt.transform.pipeline import parse_pipeline


@pytest.mark.parametrize(("text", "column", "message"), [
    ("cast{dtype= bf16}", 12, "no space after '=': write dtype=bf16"),
    ("cast{dtype = bf16}", 13, "no space after '=': write dtype=bf16"),
    ("remove\u2010dropout", 7, "character '\u2010' (U+2010 HYPHEN) is not ASCII; type '-'"),
    ("dce\uff0ccse", 4, "character '\uff0c' (U+FF0C FULLWIDTH COMMA) is not ASCII; type ','"),
    ("dc\u00e9", 3, "character '\u00e9' (U+00E9 LATIN SMALL LETTER E WITH ACUTE) is not ASCII"),
    ('cast{dtype="bf16"}', 12, "quotes are not supported in pipeline text: write dtype=bf16"),
    ('cast{skip="a b"}', 11, "quotes are not supported in pipeline text: a value cannot hold spaces or braces"),
])
def test_message_names_the_fix(text, column, message):
    with pytest.raises(PipelineParseError) as info:
        parse_pipeline(text)
    assert info.value.column == column
    assert info.value.reason == message or info.value.reason.startswith(message), info.value.reason


def test_empty_value_before_the_next_option_is_still_an_empty_value():
    # canonical text prints an empty list as 'skip=' followed by the next option
    p = parse_pipeline("cast{skip= keep=softmax}")
    assert p.passes[0].skip == () and p.passes[0].keep == ("softmax",)
    assert parse_pipeline(str(p)) == p
