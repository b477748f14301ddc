"""Pipeline text: parsing, canonical printing, errors with columns, fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphopt import PassOptionError, PipelineParseError, parse_pipeline
from graphopt.transform.base import Option, Pass, available_passes, register_pass


@register_pass
class _OptionsProbe(Pass):
    """A pass with one option of every type, to exercise option parsing."""

    name = "test-options-probe"
    options = (
        Option("ratio", float, 0.5, "a float", check=lambda v: None if 0 <= v < 1 else "must be in [0, 1)"),
        Option("steps", int, 3, "an int"),
        Option("flag", bool, False, "a bool"),
        Option("mode", str, "fast", "a choice", choices=("fast", "slow")),
        Option("keep", list, ("layer_norm", "softmax"), "a list"),
    )

    def run(self, program, ctx):  # type: ignore[no-untyped-def]
        from graphopt import PassResult

        return PassResult(program, modified=False)


def test_parse_simple_and_canonical():
    p = parse_pipeline("remove-dropout, dce")
    assert [x.name for x in p] == ["remove-dropout", "dce"]
    assert str(p) == "remove-dropout,dce"


def test_canonical_prints_every_option_sorted():
    p = parse_pipeline("test-options-probe{steps=5 ratio=0.25}")
    assert str(p) == "test-options-probe{flag=false keep=layer_norm,softmax mode=fast ratio=0.25 steps=5}"
    assert parse_pipeline(str(p)) == p


def test_list_option_with_commas_inside_braces():
    p = parse_pipeline("test-options-probe{keep=a,b,c},dce")
    assert p.passes[0].keep == ("a", "b", "c")
    assert p.passes[1].name == "dce"


def test_preset_expands():
    from graphopt.transform.base import get_preset

    p = parse_pipeline("O1")
    assert p == parse_pipeline(get_preset("O1"))
    assert len(p) >= 3
    assert str(parse_pipeline(f"O1,{str(p)}")) == f"{p},{p}"


def test_empty_pipeline():
    assert len(parse_pipeline("  ")) == 0


@pytest.mark.parametrize(
    ("text", "column", "fragment"),
    [
        ("fuse-qkv{", 9, "unclosed '{'"),
        ("remove-dropuot", 1, "did you mean 'remove-dropout'"),
        ("dce,,dce", 5, "expected a pass name"),
        ("dce,", 5, "expected a pass name"),
        ("dce dce", 5, "expected ','"),
        ("test-options-probe{ratio}", 25, "needs a value"),
        ("test-options-probe{ratio=}", 20, "expected a number, got ''"),
        ("test-options-probe{mode=a{b}", 26, "'{' is not allowed"),
        ("test-options-probe{ratio=0.1 ratio=0.2}", 30, "given twice"),
        ("test-options-probe{ratoi=0.1}", 20, "did you mean 'ratio'"),
        ("test-options-probe{ratio=1.5}", 20, "must be in [0, 1)"),
        ("test-options-probe{steps=abc}", 20, "expected an integer"),
        ("test-options-probe{mode=fsat}", 20, "did you mean 'fast'"),
        ("dce,O1{x=1}", 5, "takes no options"),
    ],
)
def test_parse_errors_name_the_column(text, column, fragment):
    with pytest.raises(PipelineParseError) as info:
        parse_pipeline(text)
    assert info.value.column == column, str(info.value)
    assert fragment in str(info.value)
    assert f"column {column}" in str(info.value)
    assert "^" in info.value.pointer()


def test_option_errors_are_pass_option_errors():
    with pytest.raises(PassOptionError):
        parse_pipeline("test-options-probe{flag=maybe}")


def _step_strategy():
    def for_pass(name, cls):
        if not cls.options:
            return st.just(name)
        opts = {}
        for o in cls.options:
            if o.type is bool:
                opts[o.name] = st.booleans().map(lambda b: "true" if b else "false")
            elif o.choices:
                opts[o.name] = st.sampled_from(o.choices)
            elif o.type is int:
                opts[o.name] = st.integers(0, 1000).map(str)
            elif o.type is float:
                opts[o.name] = st.floats(0, 0.99, allow_nan=False).map(lambda f: repr(round(f, 4)))
            elif o.type is list:
                opts[o.name] = st.lists(st.from_regex(r"[a-z_]{1,8}", fullmatch=True), min_size=1, max_size=3).map(",".join)
            else:
                opts[o.name] = st.from_regex(r"[a-z_]{1,8}", fullmatch=True)
        chosen = st.fixed_dictionaries({}, optional=opts)

        def render(d):
            valid = {}
            for k, v in d.items():
                try:
                    cls(**valid, **{k: v})
                except PassOptionError:
                    continue  # a value (or combination) this pass's own checks refuse
                valid[k] = v
            body = " ".join(f"{k}={v}" for k, v in valid.items())
            return f"{name}{{{body}}}" if body else name

        return chosen.map(render)

    def constructible(cls):
        try:
            cls()
        except PassOptionError:
            return False  # a pass with a required option (prune-embeddings' keep list)
        return True

    return st.one_of([for_pass(n, c) for n, c in available_passes().items() if constructible(c)])


@settings(max_examples=150, deadline=None)
@given(st.lists(_step_strategy(), min_size=1, max_size=5))
def test_roundtrip_property(steps):
    p = parse_pipeline(",".join(steps))
    assert parse_pipeline(str(p)) == p
    assert str(parse_pipeline(str(p))) == str(p)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="abcdeO1-{}=, .\t_x0", max_size=40))
def test_fuzz_parser_raises_only_parse_errors(text):
    try:
        p = parse_pipeline(text)
    except PipelineParseError as e:
        assert e.column is None or 1 <= e.column <= len(text) + 1
    else:
        assert parse_pipeline(str(p)) == p
