"""graphopt: compiler-style graph optimization for recommendation models.

    import graphopt
    program = graphopt.capture(model, example_inputs)          # torch.export -> Program
    fast, report = graphopt.optimize(program, "O1,fuse-qkv")   # pass pipeline
    print(report.render())
    fast.save("bert4rec.pt2")

The core never imports a specific pass or backend at import time: passes are
registered when the registry is first used.
"""

# callable modules: graphopt.bench(...) runs graphopt.bench.bench(...), graphopt.tune(...) graphopt.tune.tune(...)
from graphopt import bench, tune
from graphopt.errors import (
    ArtifactError,
    BackendUnavailableError,
    CaptureError,
    GraphoptError,
    LoweringError,
    ModelNotFoundError,
    PassFailedError,
    PassOptionError,
    PipelineParseError,
    PostconditionError,
    PreconditionError,
    RunnerError,
)
from graphopt.ir.capture import capture
from graphopt.ir.program import InputSpec, Program
from graphopt.passlib import qdq as _qdq  # noqa: F401  (registers quantized_decomposed ops so Program.load reads int8 Programs)
from graphopt.runtime import (
    Artifact,
    IncrementalState,
    Runner,
    available_runtimes,
    load,
    lower,
    lower_incremental,
)
from graphopt.transform.base import (
    Option,
    Pass,
    PassResult,
    available_passes,
    available_presets,
    register_pass,
    register_preset,
)
from graphopt.transform.manager import PassContext, PassManager
from graphopt.transform.optimize import optimize
from graphopt.transform.pipeline import Pipeline, parse_pipeline
from graphopt.transform.report import OptimizeReport, PassRecord

__version__ = "0.1.0"

__all__ = [
    "capture",
    "optimize",
    "Program",
    "InputSpec",
    "Pass",
    "PassResult",
    "Option",
    "register_pass",
    "register_preset",
    "available_passes",
    "available_presets",
    "PassManager",
    "PassContext",
    "Pipeline",
    "parse_pipeline",
    "OptimizeReport",
    "PassRecord",
    "GraphoptError",
    "PipelineParseError",
    "PassOptionError",
    "CaptureError",
    "PreconditionError",
    "PostconditionError",
    "PassFailedError",
    "ModelNotFoundError",
    "ArtifactError",
    "LoweringError",
    "RunnerError",
    "BackendUnavailableError",
    "lower",
    "lower_incremental",
    "IncrementalState",
    "load",
    "Runner",
    "Artifact",
    "available_runtimes",
    "bench",
    "tune",
    "__version__",
]
