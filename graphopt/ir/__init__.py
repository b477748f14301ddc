"""The IR: a captured model (:class:`Program`), capture with ``torch.export``,
torch.fx helpers and shape inference. Imports nothing else of graphopt but
``graphopt.errors``."""
