"""Chest X-ray pneumonia screening stack."""

#: The project's version: the one place it is written (pyproject.toml reads it; `cxr --version` prints it).
__version__ = "0.1.0"
