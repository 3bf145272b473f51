"""``python -m dicomcache`` is the ``dicomcache`` command."""

from dicomcache.cli.main import main

raise SystemExit(main())
