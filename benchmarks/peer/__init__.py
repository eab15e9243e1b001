"""Helpers of benchmarks/peer_anomalib.py (the peer benchmark against anomalib)."""
