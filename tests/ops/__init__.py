"""Tests of zoo.ops: every op form against its naive oracle (see harness.py)."""
