"""``python -m ecoptim``: the same command line as the ``ecoptim`` console script (``ecoptim.app.cli``)."""
from .app.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
