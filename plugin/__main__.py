"""`python -m plugin inspect|export|merge`: see plugin/cli.py."""

from .cli import main

raise SystemExit(main())
