"""Launch tools around the hook, installed as ``threelc.launch``, one subpackage per job.

* :mod:`threelc.launch.examples`: the example training scripts and their shared training loop;
* :mod:`threelc.launch.cluster`: the emulated cluster (network namespaces, shaped links, wire bytes);
* :mod:`threelc.launch.bench`: the benchmarks (``threelc bench codec|train``, the GPU check);
* :mod:`threelc.launch.runs`: run folders and what is read from them (``threelc report``);
* :mod:`threelc.launch.demo`: ``threelc demo``, on top of all of them.

Imports run one way: ``demo`` and ``bench`` may use ``examples``, ``cluster`` and ``runs``;
``examples`` may use ``cluster`` and ``runs``; ``cluster`` may use ``runs``; ``runs`` uses none of
them.  Nothing here imports torch at package import time.
"""
