"""Keras training, evaluation and calibration (installed as ``cxr.train``)."""
