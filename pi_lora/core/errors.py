"""User-facing errors: each names the field or file at fault and the fix.

The CLI turns these into one message per problem and exit code 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

EXIT_USER_ERROR = 2


class PiLoraError(Exception):
    """A problem the user can fix (bad recipe, missing file, wrong model, missing GPU)."""

    def __init__(self, message: str, *, field: str | None = None, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.fix = fix

    def render(self) -> str:
        where = f"{self.field}: " if self.field else ""
        fix = f"\n    fix: {self.fix}" if self.fix else ""
        return f"{where}{self.message}{fix}"

    def __str__(self) -> str:
        return self.render()


class RecipeErrors(PiLoraError):
    """Several recipe problems reported together, so the user fixes them in one pass."""

    def __init__(self, source: str, errors: list[PiLoraError]) -> None:
        self.source = source
        self.errors = errors
        lines = [f"{len(errors)} problem(s) in {source}:"]
        lines += [f"  - {e.render()}" for e in errors]
        super().__init__("\n".join(lines))

    def render(self) -> str:
        return self.message
