"""The PI paper in miniature: a tiny base, its corpus, and `make demo` (docs/demo.md)."""
