"""Fixtures: bundles exported from real MiniLM weights."""
