"""Profiling: the measurement harness (``harness``: warm-up, interleaved timing, percentiles,
per-stage breakdown, LoadGen scenarios) and the profile stage (``stage``)."""
