"""Triton kernels, per op: <op>.py (launchers), <op>_kernels.py (the jit kernels) and
<op>_configs.py (autotune configs and pruners); a small op keeps all three in <op>.py.

Each op module exposes ``forward``, ``backward`` (same signatures and results as the
matching ``reference`` module) and ``supports(*tensors) -> reason or None``; ``ops/`` wires
them in with ``backend.lazy_impl``. Importing this package imports triton.
"""
