"""docs/benchmarks.md is assembled from sections that each benchmark rewrites in place."""

from pathlib import Path


def write_section(
    path: Path, key: str, title: str, body: str, header: str = "# Benchmarks\n"
) -> None:
    """Replace the section between this key's markers, or append it (to `header` in a new
    file)."""
    begin, end = f"<!-- bench:{key}:begin -->", f"<!-- bench:{key}:end -->"
    section = f"{begin}\n## {title}\n\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else header
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + section + tail
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)
