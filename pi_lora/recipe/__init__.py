"""The recipe: its pydantic schema (every default once), loading with `extends` and `--set`,
the checks between sections, dtype names."""
