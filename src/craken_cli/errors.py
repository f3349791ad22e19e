"""User-facing errors. Anything raised as `CrakenError` ends the CLI with exit code 2, its message
and no traceback; nothing is written before the error is raised."""

from __future__ import annotations


class CrakenError(Exception):
    """A problem the user can fix; `problems` lists every one found, each naming what to change."""

    exit_code = 2

    def __init__(self, problems: str | list[str], title: str = "invalid configuration"):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.title = title
        super().__init__(self.render())

    def render(self) -> str:
        return problems_text(self.title, self.problems)


def problems_text(title: str, problems: list[str]) -> str:
    """'craken: TITLE: PROBLEM', or one line per problem under 'craken: TITLE (N problems):'."""
    if len(problems) == 1:
        return f"craken: {title}: {problems[0]}"
    lines = [f"craken: {title} ({len(problems)} problems):"]
    lines += [f"  - {p}" for p in problems]
    return "\n".join(lines)
