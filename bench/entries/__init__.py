"""Benchmark entries, one module per architecture: each defines ``ENTRIES = [bench.registry.Entry(...), ...]``.

Every module of this package is imported by :func:`bench.registry.load_entries`.
"""
