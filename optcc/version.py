"""optcc's version (one source for the package metadata, reports and --version)."""

__version__ = "0.1.0"
