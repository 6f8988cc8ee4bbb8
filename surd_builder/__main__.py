"""``python -m surd_builder`` runs the ``surd`` command line."""

from surd_builder.cli import main

main()
