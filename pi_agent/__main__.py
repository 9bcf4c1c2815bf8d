"""``python -m pi_agent keys ...``: see pi_agent/cli.py."""
from .cli import main

raise SystemExit(main())
