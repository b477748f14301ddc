"""One test per bug the pipeline fuzzer (test_fuzz_pipelines.py) found, named after the bug.

Each runs the pipeline the fuzzer reported (shrunk by hand) on the model it
reported, with verify-each on, then checks what the fixed pass does and a
near miss where the pass still does its job.
"""

from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt import PassFailedError, PassResult
from graphopt.errors import PostconditionError
from graphopt.transform.base import Option, Pass, register_pass
from tests.transform.test_fuzz_pipelines import _one_thread_and_keep_file, check_pipeline  # noqa: F401 (autouse)


def test_prune_after_int8_dynamic_declines_quantized_linears_instead_of_crashing(program):
    """Was: prune-ffn after quantize-int8-dynamic raised AttributeError ('OpOverload' object has no
    attribute 'split'): the channel-group search read a quantized linear's weight, a dequantize
    node, as a parameter. Now it declines those layers, saying why."""
    text = "quantize-int8-dynamic{per_channel=false},prune-ffn{ratio=0.3}"
    quantized, report = graphopt.optimize(program("bert-cls:tiny"), text)  # verify-each on
    prune = report.passes[1]
    assert prune.modified is False
    assert prune.declined and all("not a parameter of its own" in d for d in prune.declined), prune.declined
    # near miss: quantizing only the attention keeps the FFN linears prunable
    partly, report = graphopt.optimize(program("bert-cls:tiny"),
                                       "quantize-int8-dynamic{skip=*intermediate*,*output.dense*},prune-ffn{ratio=0.5}")
    assert report.passes[1].modified is True and report.passes[1].stats["neurons-removed"] == 64
    widths = [tuple(w.shape) for k, w in partly.parameter_tensors().items() if "intermediate_dense_weight" in k]
    assert widths == [(32, 32), (32, 32)], widths  # 64 FFN neurons per layer -> 32


def test_cast_after_int8_casts_the_dequantized_tensors(program):
    """Was: 'quantize-int8,cast' (and the dynamic pass) produced a Program that failed to run
    ('self and mat2 must have the same dtype, BFloat16 and Float'): cast left the fp32
    dequantize outputs feeding bf16 linears. Now each dequantized tensor a bf16 op reads goes
    through one cast to bf16 (PT2E's int8-mixed-bf16 form: dequantize -> to(bf16) -> linear)."""
    prog = program("bert-cls:tiny")
    calibration = [prog.sample_inputs(seed=100 + i) for i in range(3)]
    for quantize in ("quantize-int8", "quantize-int8-dynamic"):
        assert check_pipeline("bert-cls:tiny", f"{quantize},cast") == ""
        int8, _ = graphopt.optimize(prog, quantize, calibration_data=calibration)
        mixed, _ = graphopt.optimize(int8, "cast")  # verify-each: runs, within cast's 0.1 of the int8 Program
        linears = [n for n in mixed.graph.nodes if n.target is torch.ops.aten.linear.default]
        low = 0
        for lin in linears:
            x, w = lin.args[0], lin.args[1]
            cast_w = w.target is torch.ops.aten._to_copy.default
            source = w.args[0] if cast_w else w
            if "dequantize_per_channel" not in str(source.target):
                continue  # a layer the accuracy guard kept float: plain weights
            if lin.meta["val"].dtype is torch.bfloat16:  # an int8 layer cast runs in bf16
                low += 1
                assert cast_w and w.kwargs["dtype"] is torch.bfloat16, lin.name
                assert x.meta["val"].dtype is torch.bfloat16, lin.name
            else:  # the scoring head: policy=mixed keeps it fp32, reading the dequantized weight as is
                assert not cast_w and x.meta["val"].dtype is torch.float32, lin.name
        assert low > 0, "no int8 linear runs in bf16 after cast"
        # near miss: without cast the dequantized weight feeds the linear directly, in fp32
        lin = next(n for n in int8.graph.nodes if n.target is torch.ops.aten.linear.default)
        assert "dequantize_per_channel" in str(lin.args[1].target)


@register_pass
class _DropsABias(Pass):
    """Test pass: gives the first linear a bias of the wrong length (a broken rewrite)."""

    name = "test-breaks-a-linear"

    def run(self, program, ctx):  # type: ignore[no-untyped-def]
        gm = program.gm
        lin = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default)
        gm.register_buffer("broken_bias", torch.zeros(3))
        with gm.graph.inserting_before(lin):
            lin.update_arg(2, gm.graph.get_attr("broken_bias"))
        return PassResult(program, modified=True)


def test_optimize_without_verify_each_reports_a_broken_program_in_one_line(program):
    """Was: with verify-each off, a pass that broke the graph surfaced as a raw RuntimeError from
    optimize's final drift run (a traceback on the CLI). Now it is a one-line PostconditionError
    that says how to find the pass; with verify-each the pass is named."""
    with pytest.raises(PostconditionError) as info:
        graphopt.optimize(program("dlrm:tiny"), "dce,test-breaks-a-linear", verify_each=False)
    message = str(info.value)
    assert message.startswith("pipeline 'dce,test-breaks-a-linear' produced a Program that fails to run: RuntimeError")
    assert message.endswith("run again with verify_each=True (--verify-each) to name the pass") and "\n" not in message
    with pytest.raises(PassFailedError, match=r"^pass 'test-breaks-a-linear' failed .*fails to run"):
        graphopt.optimize(program("dlrm:tiny"), "dce,test-breaks-a-linear", verify_each=True)


@register_pass
class _NudgesALinear(Pass):
    """Test pass, declared exact: adds ``by`` to the first linear's output (a wrong rewrite)."""

    name = "test-nudges-a-linear"
    options = (Option("by", float, 1e-3, "what to add"),)

    def run(self, program, ctx):  # type: ignore[no-untyped-def]
        graph = program.gm.graph
        lin = next(n for n in graph.nodes if n.target is torch.ops.aten.linear.default)
        with graph.inserting_after(lin):
            nudged = graph.call_function(torch.ops.aten.add.Tensor, (lin, self.by))
        lin.replace_all_uses_with(nudged, delete_user_cb=lambda u: u is not nudged)
        nudged.meta["val"] = lin.meta["val"]
        return PassResult(program, modified=True)


def test_exact_passes_on_a_low_precision_program_are_held_to_its_rounding(program):
    """Was: 'cast,embedding-bag-to-gather' (two-tower:tiny) and 'cast{dtype=fp16},O2' (dlrm:tiny,
    fold-batchnorm) failed verify-each: an exact pass was held to 1e-5 on a Program computing in
    bf16/fp16, where summing in another order or folding into fp16 weights moves results by an
    ulp of that dtype. Now verify-each holds exact passes to 2 x that dtype's epsilon there."""
    errors = {}
    for model, text, pass_name in (("two-tower:tiny", "cast{dtype=bf16},embedding-bag-to-gather", "embedding-bag-to-gather"),
                                   ("dlrm:tiny", "cast{dtype=bf16 policy=fast keep=softmax},fold-batchnorm", "fold-batchnorm")):
        assert check_pipeline(model, text) == "", (model, text)
        _, report = graphopt.optimize(program(model), text)
        record = next(r for r in report.passes if r.name == pass_name)
        assert record.modified, (model, text)
        errors[model] = record.verify_error
        assert record.verify_error <= 2 * torch.finfo(torch.float16).eps * 8, (model, record.verify_error)
    # (since cast's mixed policy both came out exact here: bag sums stay fp32, so the rounding
    # bound is exercised by the near miss below)
    # near misses: a wrong "exact" rewrite still fails, in fp32 at 1e-3 and in bf16 beyond its rounding
    with pytest.raises(PassFailedError, match="test-nudges-a-linear' failed .*beyond its tolerance"):
        graphopt.optimize(program("dlrm:tiny"), "test-nudges-a-linear{by=0.001}")
    with pytest.raises(PassFailedError, match="test-nudges-a-linear' failed .*beyond its tolerance"):
        graphopt.optimize(program("dlrm:tiny"), "cast{dtype=bf16},test-nudges-a-linear{by=0.5}")
