"""Serving: the embedded CPU Triton and its Python-backend model (installed as ``cxr.serving``)."""
