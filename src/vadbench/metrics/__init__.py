"""Image- and pixel-level anomaly-detection metrics, defined once, exact, memory-bounded."""
