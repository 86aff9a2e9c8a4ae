"""Tandem Transformers served with vLLM. Importing this package touches neither torch nor vLLM."""

__version__ = "0.1.0"
