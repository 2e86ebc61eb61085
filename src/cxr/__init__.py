"""Chest X-ray pneumonia screening stack."""

__version__ = "0.1.0"
