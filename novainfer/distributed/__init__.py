"""Tensor parallelism: the rank group (parallel.py), the per-step message from the driver to
the workers (step_message.py), and the worker processes and their supervision
(workers.py). One rank (rank 0) lives in the caller's process and drives; see
docs/architecture.md."""
