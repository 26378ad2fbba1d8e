"""The Archive Console: a REST API (FastAPI) with bearer-token roles and dual control, and
the small web page it serves. See ``docs/console-api.md``.

The API starts runs by submitting deployments (``migration.launch``); it never executes
a flow itself and never serves record plaintext.
"""
