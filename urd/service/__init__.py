"""The inspection service (``urd serve``): the production model of every category on the line,
every decision in the ledger, flagged parts reviewed in a web page.

One file per concern: ``uploads`` (what an upload must be), ``models`` (the served bundles, their
challenge check and hot swap), ``batcher`` (micro-batching onto ONNX Runtime), ``ledger`` (the
record), ``store`` (the image store), ``security`` (tokens and CSRF), ``app`` (the FastAPI routes
and the review page), ``client`` (``urd inspect`` / ``urd watch``).
"""
