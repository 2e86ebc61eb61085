"""Locust load tests, capacity planning and benchmarks (installed as ``cxr.loadtest``)."""
