"""Triton Python-backend entry point (embedded CPU server); the logic lives in cxr.serving."""

from cxr.serving.python_model import TritonPythonModel  # noqa: F401
