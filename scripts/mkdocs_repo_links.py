"""MkDocs hook: links from a page to repository files outside the site, checked and kept.

The pages link code, benchmark results and run outputs as relative paths (for example
`../benchmarks/results/rounds.md`), which work where the Markdown is read in the
repository. MkDocs serves only `docs_dir`, so for the site each such link is checked
against the checkout (a path that does not exist is a warning, which `--strict` turns
into a failure, like a broken page link) and rewritten: to the file on the repository
host when `repo_url` is set in mkdocs.yml, else to the path in code type.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.plugins import get_plugin_logger

log = get_plugin_logger("repo_links")

_LINK = re.compile(r"(?<!!)\[(?P<text>[^\]\n]*)\]\((?P<target>[^)\s]+)\)")
_FENCE = re.compile(r"^\s*(```|~~~)")
_BRANCH = "main"


def _rewrite(match: re.Match[str], page_dir: Path, docs: Path, repo: Path, files: Any,
             repo_url: str, page: str) -> str:
    text, target = match["text"], match["target"]
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
        return match[0]
    path, _, anchor = target.partition("#")
    resolved = (page_dir / path).resolve()
    if resolved.is_relative_to(docs) and files.get_file_from_path(
        resolved.relative_to(docs).as_posix()
    ):
        return match[0]  # a page or asset of the site: MkDocs checks it
    if not resolved.is_relative_to(repo) or not resolved.exists():
        log.warning("%s links to %s, which is not in the repository", page, target)
        return match[0]
    rel = resolved.relative_to(repo).as_posix()
    if repo_url:
        kind = "tree" if resolved.is_dir() else "blob"
        fragment = f"#{anchor}" if anchor else ""
        return f"[{text}]({repo_url.rstrip('/')}/{kind}/{_BRANCH}/{rel}{fragment})"
    return text if text.strip("`") == rel else f"{text} (`{rel}`)"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    docs = Path(config["docs_dir"]).resolve()
    repo = Path(config["config_file_path"]).resolve().parent
    page_dir = (docs / page.file.src_uri).parent
    out, fenced = [], False
    for line in markdown.split("\n"):
        if _FENCE.match(line):
            fenced = not fenced
        if not fenced:
            line = _LINK.sub(
                lambda m: _rewrite(m, page_dir, docs, repo, files, config.get("repo_url") or "",
                                   page.file.src_uri),
                line,
            )
        out.append(line)
    return "\n".join(out)
