"""The one base class for bad input, wherever it is found (API, worker, CLI).

Each carries a stable machine-readable `code` and a human `message`: the API turns it into
``{"error": {"code", "message"}}`` with a 4xx status, the worker into a failed job with that
reason, the CLI into ``error: <code>: <message>`` and exit status 2.
"""

from __future__ import annotations


class InputError(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
