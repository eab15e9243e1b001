"""Leaderboards, Δ-tables, curves and anomaly-map galleries."""
