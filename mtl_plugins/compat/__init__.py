"""Fixes for the pinned third-party stack, applied once, in one place (docs/install.md)."""
