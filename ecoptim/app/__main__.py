"""``python -m ecoptim.app``: the same command line as ``python -m ecoptim`` and the ``ecoptim`` script."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
