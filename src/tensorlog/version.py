"""The package version, importable from anywhere without importing the package's public API."""

__version__ = "0.2.0"
