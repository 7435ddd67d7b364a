"""Foundations every stage uses: user errors, safe YAML and paths, the run lock, digests,
quieting third-party noise, the CPU allocator setting."""
