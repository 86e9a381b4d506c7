"""``python -m ecoptim``: the same command line as the ``ecoptim`` console script."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
