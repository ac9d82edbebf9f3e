"""Bridges to other training frameworks (imported lazily: they are optional)."""
