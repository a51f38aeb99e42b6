"""``python -m lipia``: the same as the ``lipia`` command."""

from lipia.cli import main

main()
