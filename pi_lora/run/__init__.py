"""The run directory: its on-disk format and typed reader, the adapter card, provenance, base
integrity, recorded outcomes, and loading what a run trained."""
