"""Backend lowerers and runners (installed as ``graphopt.runtimes``), one module each."""
