"""Scoring: the metrics on generated answers (scores.py, pure functions) and the greedy
generation that produces them for one client (generation.py)."""
