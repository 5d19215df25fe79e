"""Large-gallery retrieval on FAISS: :class:`GalleryIndex` (exact / IVF / IVF-PQ)."""

from .index import GalleryIndex, IndexKind, SearchResult

__all__ = ["GalleryIndex", "IndexKind", "SearchResult"]
