"""Offline side of hetserve: export, profile, cut, build stages, archive."""
