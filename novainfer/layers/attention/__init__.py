"""Attention: per-step metadata, the backend interface, and the backends."""

from novainfer.layers.attention.backend import AttentionBackend, available_backends, get_backend
from novainfer.layers.attention.metadata import AttentionMetadata

__all__ = ["AttentionBackend", "AttentionMetadata", "available_backends", "get_backend"]
