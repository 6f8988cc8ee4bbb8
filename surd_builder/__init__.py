"""surd: build (narrative prompt, keyword prompt, image) datasets and train the SUR-adapter.

``surd_builder`` is the core every other package stands on: the sample schema, the workspace
(tables, atomic writes, manifest), typed errors, ids, and the ``surd`` command line.
"""

__version__ = "0.1.0"
