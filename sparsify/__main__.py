"""``python -m sparsify``: the same as the ``sparsify`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
