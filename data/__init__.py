"""Data loading for the evaluations: the needle-in-a-haystack haystack and LongBench."""
