"""The HTTP API (FastAPI). Never imports torch or `trainers`: the web process starts fast
and never touches CUDA (tests/test_layering.py enforces it)."""
