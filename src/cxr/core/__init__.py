"""The base layer: the contract, imaging, errors, durable writes, security and the model folder (installed as ``cxr.core``)."""
