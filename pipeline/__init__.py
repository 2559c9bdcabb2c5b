"""The MLOps layer around `urd`: DVC stage entry points, tracking, registry, flows.

Only orchestration lives here; the method itself is the `urd` package, which never imports this one.
"""
