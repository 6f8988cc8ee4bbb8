"""Where the scrape stage finds (image URL, prompt) pairs; see ``base.py`` for the interface."""
