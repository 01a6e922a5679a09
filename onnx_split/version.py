"""The package version (one place; __init__ and every writer of provenance read it)."""
__version__ = "0.1.0"
