"""The benchmarks: ``threelc bench codec`` (codec ratio and throughput, ``codec``; it also holds
the ``threelc bench`` subcommand table), ``threelc bench train`` (hooks x link rates on the
emulated cluster, ``bench_train``, and the document written from its results, ``bench_doc``), the
AdamW benchmark (``adamw``: validation loss against whole-run bytes per optimizer variant),
real gradients captured from the examples (``gradients``), the hook's peak memory against
allreduce (``memory``) and the GPU check (``gpu_check``).
May import :mod:`threelc.launch.examples`, :mod:`threelc.launch.cluster` and
:mod:`threelc.launch.runs`; nothing imports it but the ``threelc`` command line.
"""
