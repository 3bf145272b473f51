"""``python -m dicomcache`` is the ``dicomcache`` command."""

from .cli import main

raise SystemExit(main())
