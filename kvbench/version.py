"""kvbench's version: a leaf, so provenance can read it without the package's lazy library API."""

__version__ = "0.1.0"
