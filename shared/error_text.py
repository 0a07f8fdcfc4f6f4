"""Error messages as clients see them: short, and without server paths.

Messages are built from exceptions whose text may carry an absolute path (an ``OSError``
names the file it failed on: the storage root, a temp folder) or echo client input of any
length. Both leak: paths describe the server, long echoes cost bandwidth and log space.
Every message that leaves the service (an API error, a failed job's ``error.message``)
goes through `public_message`.
"""

from __future__ import annotations

import re

#: Longest message a client sees; longer ones are cut with an ellipsis.
MESSAGE_MAX_CHARS = 300

# An absolute POSIX path of at least two segments, not part of a URL or a relative key.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s'\"/:,;()\[\]]+/)+([^\s'\"/:,;()\[\]]*)")
_SPACES = re.compile(r"\s+")


def public_message(text: object, limit: int = MESSAGE_MAX_CHARS) -> str:
    """`text` with absolute paths reduced to their last part, whitespace collapsed, and at
    most `limit` characters."""
    message = _ABSOLUTE_PATH.sub(lambda m: m.group(1) or "<path>", str(text))
    message = _SPACES.sub(" ", message).strip()
    if len(message) > limit:
        message = message[: limit - 1].rstrip() + "\u2026"
    return message
