"""The speed benchmark: smolcluster against one process, PyTorch DDP (gloo) and a pickle parameter server.

Run it by hand, never as a timed test: `uv run --group bench python -m bench` (docs/benchmarks.md).
Nothing here is imported by the library; this package imports nothing heavy at the top, so the
small helper processes it starts (proxy, loopback blast) do not pay for `import torch`.
"""
