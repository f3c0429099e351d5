"""Embedded demo corpus and its loopback server."""
