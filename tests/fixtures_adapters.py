"""Fixtures: real PEFT adapters trained on MiniLM by the project's own scripts."""
