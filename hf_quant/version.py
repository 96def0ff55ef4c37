"""hf_quant's version (one place; imported by the package and by the records and cards it writes)."""

__version__ = "0.1.0"
