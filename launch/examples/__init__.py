"""The example training scripts (``python -m threelc.launch.examples.train_digits`` and
``train_text``, run under torchrun), the training loop they share (``trainer``), their data
sharding (``data``) and the hooks they can attach by name with byte accounting (``comm``).
May import :mod:`threelc.hooks`, :mod:`threelc.launch.cluster` (link counters) and
:mod:`threelc.launch.runs` (run folders); never :mod:`threelc.launch.bench`.
"""
