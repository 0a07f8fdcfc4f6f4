"""Make an API_KEYS entry: ``python -m shared.security hash NAME [KEY]``.

Prints ``NAME:<sha256 of KEY>`` for the API_KEYS setting (comma-separated). Without KEY a
random one is generated and printed once: only its hash is ever configured.
"""

from __future__ import annotations

import secrets
import sys

from shared.settings import hash_api_key


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (2, 3) or argv[0] != "hash":
        print(__doc__.strip(), file=sys.stderr)
        return 2
    name = argv[1]
    key = argv[2] if len(argv) == 3 else secrets.token_urlsafe(32)
    if len(argv) == 2:
        print(f"key (give it to the client, store it nowhere else): {key}", file=sys.stderr)
    print(f"{name}:{hash_api_key(key)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
