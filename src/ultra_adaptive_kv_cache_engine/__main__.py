"""`python -m ultra_adaptive_kv_cache_engine` runs the `uakv` command line."""

from .cli import main

raise SystemExit(main())
