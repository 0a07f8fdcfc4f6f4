"""``python -m client ...``: the ``heatmap`` program without the installed entry point."""

from client.commands import main

raise SystemExit(main())
