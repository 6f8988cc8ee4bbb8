"""Build stages: ingest (and later scrape, rewrite, screen, dedupe) and export.

Start with ``pipelines/base.py``: it defines the stage contract every stage follows.
"""
