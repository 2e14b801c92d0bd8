"""The emulated cluster: network namespaces joined by tc-shaped veth links (``netns``), the
``threelc emulate`` command that runs a torchrun job on them (``emulate``), the link counters a
process reads in its namespace (``linkstats``) and wire bytes set beside the hook's own count
(``wirebytes``).  Needs no torch.  May import :mod:`threelc.launch.runs` (run folders); never
:mod:`threelc.launch.examples` or :mod:`threelc.launch.bench`: it runs any command it is given.
"""
