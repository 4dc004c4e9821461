"""Callbacks: data refresh at epoch boundaries, FlagEmbedding-compatible export (more to come)."""
