"""Pass infrastructure: the pass protocol and registry, pipeline text, the pass
manager and its instruments, analyses, the rewrite-rule layer and
``optimize``. Imports the IR only; passes register themselves on first use."""
