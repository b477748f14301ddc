"""Built-in passes (installed as ``graphopt.passes``): one module per pass.

Importing this package registers every pass and the preset pipelines.
"""

from graphopt.pass_base import register_preset
from graphopt.passes import dce, remove_dropout, remove_noop  # noqa: F401  (registration)

register_preset("O1", "remove-dropout,remove-noop,dce", "cleanup: dropout, no-op views/clones/casts, dead code")
