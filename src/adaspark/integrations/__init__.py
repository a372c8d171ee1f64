"""Integrations with other libraries (transformers). Imported lazily by ``adaspark.patch``."""
