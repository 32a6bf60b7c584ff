"""The package version (one place; the package root, the stage records and the pool manifest read it)."""
__version__ = "0.1.0"
