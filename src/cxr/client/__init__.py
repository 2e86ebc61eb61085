"""Thin Triton client for the pneumonia model (installed as ``cxr.client``).

>>> from cxr.client import PneumoniaClient
>>> with PneumoniaClient("127.0.0.1:8001", protocol="grpc") as c:
...     print(c.predict(["xray.jpeg"])[0].label)
"""

from cxr.client.client import PneumoniaClient, Prediction, RetryPolicy
from cxr.client.transport import PROTOCOLS, ModelInfo

__all__ = ["PROTOCOLS", "ModelInfo", "PneumoniaClient", "Prediction", "RetryPolicy"]
