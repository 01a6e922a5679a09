"""``--include`` / ``--exclude``: which sites a run may split, by node name.

A pattern is a glob (``fnmatch``, case-sensitive, matching the whole name: ``*mlp*``,
``/h.?/mlp/*``) or, with the prefix ``re:``, a regular expression searched anywhere in the name
(``re:^/h\\.[0-5]/``; anchor it with ``^``/``$``). A site matches a pattern when the pattern
matches its node name, the name the report shows for it (``<scope>/<name>`` inside If/Loop/Scan
bodies), or one of the module paths a PyTorch export records in the node's
``pkg.torch.onnx.name_scopes`` metadata (``['', 'h.0', 'h.0.mlp', 'h.0.mlp.c_fc', ...]``: a
module's pattern matches every node inside it).

With ``include`` patterns, a site must match one of them; a site matching an ``exclude`` pattern
is never split. Both apply before planning, so lossless, lossy and ``--dry-run`` runs alike keep
the other sites, each with the pattern that left it out, and no chain joins a site left out.

Pure: no onnx import here (sites are read through their ``name``, ``scope`` and ``node``).
"""
from __future__ import annotations

import ast
import fnmatch
import re
from dataclasses import dataclass

REGEX_PREFIX = "re:"
LEFT_OUT = ("excluded by --exclude ", "not matched by --include ")
"""How the reason of every site the patterns leave out begins."""
NAME_SCOPES = "pkg.torch.onnx.name_scopes"


@dataclass(frozen=True)
class Pattern:
    text: str  # as the user gave it
    match: object  # (name) -> bool

    def __call__(self, name: str) -> bool:
        return bool(self.match(name))


def compile_pattern(option: str, text: str) -> Pattern:
    """``text`` as a :class:`Pattern`; ValueError with a one-line reason if it cannot be one."""
    if not isinstance(text, str):
        raise ValueError(f"{option} takes name patterns (strings), got {text!r}")
    if text.startswith(REGEX_PREFIX):
        body = text[len(REGEX_PREFIX):]
        if not body:
            raise ValueError(f"{option} {text!r}: the regular expression after 're:' is empty")
        try:
            regex = re.compile(body)
        except re.error as exc:
            raise ValueError(f"{option} {text!r} is not a valid regular expression: {exc}") from None
        return Pattern(text, regex.search)
    if not text:
        raise ValueError(f"{option} '': an empty pattern matches no node name")
    regex = re.compile(fnmatch.translate(text))
    return Pattern(text, regex.match)


def compile_patterns(option: str, texts) -> tuple[Pattern, ...]:
    return tuple(compile_pattern(option, t) for t in texts)


def site_names(site) -> list[str]:
    """Every name a pattern is matched against for ``site``."""
    names = [site.name]
    if site.scope != "main":
        names.append(f"{site.scope}/{site.name}")
    names += module_scopes(site.node)
    return names


def module_scopes(node) -> list[str]:
    """The module paths of ``pkg.torch.onnx.name_scopes`` (without the root ``''``), if the metadata
    is there and is a plain list of strings; else none."""
    raw = next((p.value for p in node.metadata_props if p.key == NAME_SCOPES), None)
    if raw is None:
        return []
    try:
        scopes = ast.literal_eval(raw)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return []
    if not isinstance(scopes, (list, tuple)) or not all(isinstance(s, str) for s in scopes):
        return []
    return [s for s in scopes if s]


def _quoted(patterns) -> str:
    return " or ".join(repr(p.text) for p in patterns)


def left_out(sites, include: tuple[str, ...], exclude: tuple[str, ...]) -> dict[int, str]:
    """{site index: why it is left out} for the sites the patterns leave out."""
    inc, exc = compile_patterns("--include", include), compile_patterns("--exclude", exclude)
    out: dict[int, str] = {}
    for i, site in enumerate(sites):
        names = site_names(site)
        hit = next((p for p in exc if any(p(n) for n in names)), None)
        if hit is not None:
            out[i] = f"{LEFT_OUT[0]}{hit.text!r}"
        elif inc and not any(p(n) for p in inc for n in names):
            out[i] = f"{LEFT_OUT[1]}{_quoted(inc)}"
    return out


def unmatched(sites, include: tuple[str, ...], exclude: tuple[str, ...]) -> list[str]:
    """Notes for the patterns that match no MatMul/Gemm site (a typo, most often)."""
    notes = []
    for option, texts in (("--include", include), ("--exclude", exclude)):
        for p in compile_patterns(option, texts):
            if not any(p(n) for site in sites for n in site_names(site)):
                notes.append(f"{option} {p.text!r} matches no MatMul/Gemm node")
    return notes
