"""The ``surd`` command line: the one package that imports ``pipelines``, ``annotation`` and
``adapter`` (see ARCHITECTURE.md). ``app`` is the root Typer app; one module per command group."""

from surd_builder.cli.app import app, main

__all__ = ["app", "main"]
