"""Report views: a study's own question answered in one section (``registry`` lists them)."""
