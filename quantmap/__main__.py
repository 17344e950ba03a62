"""``python -m quantmap`` is the ``quantmap`` command."""

from quantmap.cli import main

main()
