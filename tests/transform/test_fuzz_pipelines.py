"""Pipeline fuzzing: Hypothesis builds pipelines from every registered pass with valid
random options and runs them on the tiny zoo models with verify-each on.

Strategies come from the registry, not from a list kept here: each ``Option``'s
type, choices and ``check`` give its values (a value the option's check or
the pass's ``validate`` refuses is redrawn); list options without choices draw
from words of the model at hand (its op families, aten ops, node names,
module paths, embedding tables, item ids and id ranges), so ``cast{keep=...}``,
``quantize-int8{skip=...}`` and ``prune-embeddings{keep=...}`` get values that
can match. A new pass is fuzzed as soon as it is registered.

What a run must do (the oracle):

* finish, or be refused with a one-line GraphoptError that is not a
  PostconditionError (a pass declining a model it cannot take is fine; a
  pass breaking the graph, its ``modified`` flag, an exact pass's numerics,
  or raising a foreign exception is a bug);
* an approximate pass that verify-each refused for missing its declared
  tolerance by less than 4x is an accuracy finding, recorded (hypothesis
  ``event``, ``ACCURACY_FINDINGS``), not a bug: verify-each did its job;
  by more, it is a bug;
* the result runs at a second shape (verify-each only ran the example
  shape), outputs of the same shapes, finite where the original's are;
* a pipeline of exact passes only matches the original model there within
  1e-4 (abs + rel).

Profiles (``GRAPHOPT_FUZZ``): ``ci`` (default) runs a fixed, derandomized set
of examples (10 per model, one thread), time-boxed to ``GRAPHOPT_FUZZ_BUDGET_S`` (25 s,
shared by the models); ``long`` runs many random
examples per model (``GRAPHOPT_FUZZ_EXAMPLES``, default 500) and also saves and
reloads one result in eight (an export and a load take seconds). A failure names the model and the pipeline text.

Left out of the ``ci`` profile only, with the reason (``long`` runs them):
``prune-embeddings{keep_file=...}`` reads an id file (external data: the long
profile writes one); ``bert4rec-text:tiny`` loads the MiniLM weights package
and is the slowest tiny model to capture; ``quantize-int8{calibration=entropy|mse}``
searches 2048-bin histograms per layer (seconds per example).
"""

from __future__ import annotations

import os
import re
import tempfile
import time
import traceback
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

import graphopt
from graphopt.errors import GraphoptError, PassFailedError, PassOptionError, PostconditionError
from graphopt.ir.program import Program
from graphopt.models import available_models
from graphopt.transform.base import available_passes, available_presets
from graphopt.transform.pipeline import parse_pipeline

PROFILE = os.environ.get("GRAPHOPT_FUZZ", "ci")
LONG = PROFILE == "long"
settings.register_profile("graphopt-fuzz-ci", max_examples=10, derandomize=True, deadline=None,
                          phases=[Phase.explicit, Phase.generate],  # a failure is reported as found, unshrunk
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
                          print_blob=True)
settings.register_profile("graphopt-fuzz-long", max_examples=int(os.environ.get("GRAPHOPT_FUZZ_EXAMPLES", "500")),
                          derandomize=False, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

#: models and option values left out of the ci profile (see the module docstring for why)
CI_SKIP_MODELS = {"bert4rec-text:tiny"}
CI_SKIP_VALUES = {("prune-embeddings", "keep_file"), ("quantize-int8", "calibration", "entropy"),
                  ("quantize-int8", "calibration", "mse")}
MODELS = [m for m in available_models() if m.endswith(":tiny") and (LONG or m not in CI_SKIP_MODELS)]
EXACT_ATOL = EXACT_RTOL = 1e-4
_PROGRAMS: dict[str, Program] = {}
_KEEP_FILE = Path(tempfile.gettempdir()) / f"graphopt-fuzz-keep-{os.getpid()}.txt"


def _program(name: str) -> Program:
    """The captured model, shared with the suite's ``program`` fixture (tests/conftest.py) when it
    runs under pytest; read here, never changed (optimize works on a copy)."""
    try:
        from tests.conftest import _CAPTURED as cache
    except ImportError:  # run outside the test suite
        cache = _PROGRAMS
    if name not in cache:
        from graphopt.models import load_model

        cache[name] = load_model(name).capture()
    return cache[name]


def _fuzzed_passes() -> dict:
    # test modules register deliberately broken passes named test-*: they are not the product
    return {n: c for n, c in available_passes().items() if not n.startswith("test-")}


# ------------------------------------------------------------ model vocabulary
def _vocabulary(program: Program) -> list[str]:
    """Words a list option may be given for this model: op families and ops, node names,
    module paths (and fnmatch patterns of them), embedding tables, item ids and ranges."""
    from graphopt.passlib.precision import FP32_FAMILIES

    words = set(FP32_FAMILIES) | {"score", "tail", "reductions", "*", "*.0.*", "linear*"}
    for node in program.gm.graph.nodes:
        if node.op == "call_function":
            words.add(node.name)
            packet = getattr(node.target, "_overloadpacket", None)
            if packet is not None:
                words.add(packet.__name__)
        elif node.op == "get_attr":
            words.add(str(node.target))
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            words.add(str(path).removeprefix("L['self'].").replace("L__self___", ""))
    rows = max([int(spec.high) for spec in program.inputs if spec.high is not None] or [8])
    words |= {str(i) for i in (0, 1, 2, 3, rows // 2, rows - 1)} | {f"1-{rows // 2}", f"{rows // 3}-{rows - 1}"}
    return sorted(w for w in words if w and not any(c in w for c in " {},="))


def _values(pass_name: str, opt, vocab: list[str]) -> st.SearchStrategy:
    """A strategy for one option's text value; invalid ones are filtered by the caller."""
    def allowed(value) -> bool:
        return LONG or (pass_name, opt.name, value) not in CI_SKIP_VALUES

    if opt.type is bool:
        return st.booleans().map(opt.format)
    if opt.choices:
        choices = [c for c in opt.choices if allowed(c)]
        if opt.type is list:
            return st.lists(st.sampled_from(choices), min_size=1, max_size=len(choices), unique=True).map(",".join)
        return st.sampled_from(choices).map(opt.format)
    if opt.type is int:
        d = int(opt.default or 0)
        return st.one_of(st.just(d), st.integers(-1, 8), st.integers(0, max(16, 2 * abs(d)))).map(str)
    if opt.type is float:
        d = float(opt.default or 0.0)
        span = 2 * abs(d) + 1
        return st.one_of(st.just(d), st.floats(0.0, 1.0, exclude_max=True), st.floats(-span, span)).map(repr)
    if (pass_name, opt.name) == ("cast", "keep"):  # cast refuses words that name no op family or aten op
        import torch

        from graphopt.passlib.precision import FP32_FAMILIES

        ops = [w for w in vocab if w in FP32_FAMILIES or w in ("score", "tail") or hasattr(torch.ops.aten, w)]
        return st.lists(st.sampled_from(ops), min_size=1, max_size=4, unique=True).map(",".join)
    if opt.type is list:  # words of the model, or only its ids and id ranges
        numbers = [w for w in vocab if w[0].isdigit()]
        return st.one_of(st.lists(st.sampled_from(vocab), min_size=1, max_size=4, unique=True),
                         st.lists(st.sampled_from(numbers), min_size=1, max_size=4, unique=True)).map(",".join)
    if (pass_name, opt.name) == ("prune-embeddings", "keep_file") and LONG:
        return st.just(str(_KEEP_FILE))
    return st.just(opt.format(opt.default))


@st.composite
def _step(draw, vocab: list[str]) -> str:
    passes = _fuzzed_passes()
    name = draw(st.sampled_from([*passes, "O1", "O2"]))
    if name in available_presets():
        return name
    cls = passes[name]
    chosen: dict[str, str] = {}
    for opt in cls.options:
        if not LONG and (name, opt.name) in CI_SKIP_VALUES:
            continue
        if draw(st.booleans()):  # about half the options keep their default
            continue
        value = draw(_values(name, opt, vocab))
        try:
            cls(**chosen, **{opt.name: value})
        except PassOptionError:
            continue  # a value (or combination) the option's check or the pass's validate refuses
        chosen[opt.name] = value
    try:
        cls(**chosen)
    except PassOptionError:  # a pass with a required option (prune-embeddings' keep): draw it
        opt = next(o for o in cls.options if o.name == "keep")
        chosen[opt.name] = draw(_values(name, opt, vocab))
        try:
            cls(**chosen)
        except PassOptionError:
            return "dce"
    body = " ".join(f"{k}={v}" for k, v in chosen.items())
    return f"{name}{{{body}}}" if body else name


def pipelines(model: str) -> st.SearchStrategy[str]:
    """Pipeline texts for ``model``: 1 to 4 steps (passes with drawn options, or presets)."""
    vocab = _vocabulary(_program(model))
    return st.lists(_step(vocab), min_size=1, max_size=4).map(",".join)


@st.composite
def cases(draw) -> tuple[str, str]:
    """(model, pipeline text), for drivers that fuzz every model at once."""
    model = draw(st.sampled_from(MODELS))
    return model, draw(pipelines(model))


# ------------------------------------------------------------------- oracle
def _second_shape(program: Program) -> dict[str, int]:
    example = program.sample_inputs()
    sizes = {}
    for spec, x in zip(program.inputs, example):
        for dim, label in spec.dynamic.items():
            sizes.setdefault(label, max(1, int(x.shape[dim]) - 1) if label != "batch" else int(x.shape[dim]) + 1)
    return sizes


def _is_exact(pipeline_text: str) -> bool:
    return all(p.exact for p in parse_pipeline(pipeline_text))


#: approximate passes that missed their declared tolerance by less than APPROXIMATE_SLACK x
ACCURACY_FINDINGS: list[str] = []
APPROXIMATE_SLACK = 4.0
_NUMERICS = re.compile(r"pass '([^']+)' changed the numerics beyond its tolerance: .*max abs error ([0-9.e+-]+) "
                       r"exceeds tolerance ([0-9.e+-]+)")


def _accuracy_finding(pipeline, error: PassFailedError) -> bool:  # type: ignore[no-untyped-def]
    """An approximate pass whose result verify-each refused for being a little less accurate
    than it declares: verify-each did its job (the user gets the error, not the model). It is
    recorded for the report, not a bug here; an exact pass, a miss by more than
    APPROXIMATE_SLACK x, or non-finite values are bugs."""
    match = _NUMERICS.search(str(error.__cause__ or ""))
    if not match:
        return False
    step = next((p for p in pipeline if p.name == match.group(1)), None)
    err, tol = float(match.group(2)), float(match.group(3))
    if step is None or step.exact or err > APPROXIMATE_SLACK * tol:
        return False
    ACCURACY_FINDINGS.append(f"{step.step_text()}: max abs error {err:g} > declared {tol:g}")
    event(f"accuracy finding: {step.name}")
    return True


def check_pipeline(model: str, text: str) -> str:
    """Run ``text`` on ``model`` with verify-each and the oracle; '' when fine, else why not."""
    program = _program(model)
    pipeline = parse_pipeline(text)
    calibration = [program.sample_inputs(seed=100 + i) for i in range(3)]
    needs = any("calibration_data" in p.requires for p in pipeline)
    try:
        optimized, _ = graphopt.optimize(program, pipeline, calibration_data=calibration if needs else None,
                                         verify_each=True)
    except PassFailedError as e:
        cause = e.__cause__
        if isinstance(cause, GraphoptError) and not isinstance(cause, PostconditionError) and "\n" not in str(e):
            return ""  # a pass refused this model, with one line saying why
        if _accuracy_finding(pipeline, e):
            return ""
        return f"{e}\n{''.join(traceback.format_exception(cause)) if cause else ''}"
    except Exception as e:  # noqa: BLE001 - anything else is the bug being looked for
        return f"optimize raised {type(e).__name__}: {e}\n{traceback.format_exc()}"
    sizes = _second_shape(program)
    feeds = program.sample_inputs(batch=sizes.get("batch"), seq=sizes.get("seq"), seed=11)
    expected = program(*feeds)
    feeds_opt = tuple(x.to(s.dtype) if x.is_floating_point() else x for x, s in zip(feeds, optimized.inputs))
    try:
        got = optimized(*feeds_opt)
    except Exception as e:  # noqa: BLE001
        return f"the optimized Program fails at {sizes}: {type(e).__name__}: {e}"
    if len(got) != len(expected):
        return f"{len(got)} outputs, the original has {len(expected)}"
    for i, (g, x) in enumerate(zip(got, expected)):
        if g.shape != x.shape:
            return f"output {i} at {sizes}: shape {list(g.shape)}, the original's {list(x.shape)}"
        if g.is_floating_point() and bool(torch.isfinite(x).all()) and not bool(torch.isfinite(g).all()):
            return f"output {i} at {sizes}: non-finite values where the original's are finite"
    if _is_exact(text):
        for i, (g, x) in enumerate(zip(got, expected)):
            err = (g.double() - x.double()).abs()
            bound = EXACT_ATOL + EXACT_RTOL * x.double().abs()
            if not bool((err <= bound).all()):
                return f"exact pipeline, output {i} at {sizes}: max |error| {err.max().item():.3g} > 1e-4"
    if LONG and zlib.crc32(f"{model} {text}".encode()) % 8 == 0:  # export + load take ~10 s: 1 in 8
        with tempfile.TemporaryDirectory() as td:
            try:
                optimized.save(Path(td) / "p.pt2")
                reloaded = Program.load(Path(td) / "p.pt2")
                again = reloaded(*feeds_opt)
            except Exception as e:  # noqa: BLE001
                return f"save/load of the result failed: {type(e).__name__}: {e}"
            for i, (a, g) in enumerate(zip(again, got)):
                if a.shape != g.shape or not torch.allclose(a.double(), g.double(), atol=1e-5, rtol=1e-5, equal_nan=True):
                    return f"output {i} differs after save/load"
    return ""


@pytest.fixture(scope="module", autouse=True)
def _one_thread_and_keep_file():
    """Tiny models gain nothing from a second thread, and on a loaded machine two threads
    per forward are 10x slower (measured: 0.02 s vs 0.2-0.6 s for bert-cls:tiny)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _KEEP_FILE.write_text("# id count\n1 5\n2 1\n3 9\n7 2\n")
    for model in MODELS:  # captured before the time box starts (the suite shares these captures)
        _program(model)
    yield
    _KEEP_FILE.unlink(missing_ok=True)
    torch.set_num_threads(threads)


#: the ci profile stops running new examples after this many seconds (a slow CI machine checks
#: fewer of the fixed examples, in the same order, rather than overrunning the suite's budget)
CI_BUDGET_S = float(os.environ.get("GRAPHOPT_FUZZ_BUDGET_S", "25"))
_CLOCK: dict[str, float] = {}


@pytest.mark.parametrize("model", MODELS)
@settings(settings.get_profile(f"graphopt-fuzz-{'long' if LONG else 'ci'}"))
@given(data=st.data())
def test_fuzzed_pipelines_keep_the_contract(model, data):
    """Per model (so each gets its share); the ci time box is split evenly between them."""
    text = data.draw(pipelines(model), label="pipeline")
    started = _CLOCK.setdefault(model, time.monotonic())
    if not LONG and "failed" not in _CLOCK and time.monotonic() - started > CI_BUDGET_S / len(MODELS):
        event("not run: ci time budget spent")
        return
    problem = check_pipeline(model, text)
    if problem:
        _CLOCK["failed"] = 1.0  # Hypothesis replays a failure: never time-box the replay
    assert not problem, f"model {model}, pipeline {text!r}:\n{problem}"


def test_the_strategy_reaches_every_pass_and_option():
    """The generator is not vacuous: every fuzzed pass and every option of it shows up
    (with a non-default value) in a sample of generated pipelines for bert4rec:tiny."""
    vocab = _vocabulary(_program("bert4rec:tiny"))
    seen_passes, seen_options = set(), set()

    @settings(max_examples=400, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(step=_step(vocab))
    def sample(step):
        for p in parse_pipeline(step):
            seen_passes.add(p.name)
        if "{" in step:
            name, body = step.rstrip("}").split("{", 1)
            seen_options.update((name, kv.split("=", 1)[0]) for kv in body.split(" "))

    sample()
    passes = _fuzzed_passes()
    assert set(passes) <= seen_passes, sorted(set(passes) - seen_passes)
    expected = {(n, o.name) for n, c in passes.items() for o in c.options if LONG or (n, o.name) not in CI_SKIP_VALUES}
    assert expected <= seen_options, sorted(expected - seen_options)
    assert "layer_norm" in vocab and any("-" in w and w[0].isdigit() for w in vocab)
