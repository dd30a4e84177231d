"""Triton kernels, one file per op (forward and backward kernels, then their launchers).

Each op module exposes ``forward``, ``backward`` (same signatures and results as the
matching ``reference`` module) and ``supports(*tensors) -> reason or None``; ``ops/`` wires
them in with ``backend.lazy_impl``. Importing this package imports triton.
"""
