"""``python -m qaconv_gs``: the same command line as the ``qaconv-gs`` console script."""

from .cli import main

raise SystemExit(main())
