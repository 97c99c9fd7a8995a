"""Flower's own app-bundle (FAB) builder: fixed timestamps and sorted entries, so the same sources give the
same bytes (common/bundle.py)."""

from flwr.cli.build import build_fab_from_files

__all__ = ["build_fab_from_files"]
