"""Route prefix -> service lookup: longest prefix wins, on path-segment boundaries."""

from __future__ import annotations

from collections.abc import Mapping


class RouteTable:
    """Maps request paths to service names.

    `/sona` matches `/sona` and `/sona/x`, never `/sonar`. Lookup costs one dict probe per path
    segment up to the deepest configured prefix, whatever the number of prefixes.
    """

    __slots__ = ("_depth", "_first", "_prefixes", "_root")

    def __init__(self, routes: Mapping[str, str]) -> None:
        prefixes: dict[str, str] = {}
        root: str | None = None
        for prefix, service in routes.items():
            if not isinstance(prefix, str) or not prefix.startswith("/"):
                raise ValueError(f"route prefix must start with '/': {prefix!r}")
            normalized = prefix.rstrip("/")
            if not normalized:
                root = service
            else:
                prefixes[normalized] = service
        self._prefixes = prefixes
        # Single-segment prefixes by their segment: "/sona" -> "sona".
        self._first = {p[1:]: s for p, s in prefixes.items() if p.count("/") == 1}
        self._root = root
        self._depth = max((p.count("/") for p in prefixes), default=0)

    def __len__(self) -> int:
        return len(self._prefixes) + (self._root is not None)

    def services(self) -> set[str]:
        names = set(self._prefixes.values())
        if self._root is not None:
            names.add(self._root)
        return names

    def first_segments(self) -> tuple[dict[str, str], set[str], str | None]:
        """What a caller needs to route most paths by their first segment alone: the services
        of single-segment prefixes by that segment (none of them also begins a deeper prefix),
        the first segments that need `match` (they begin a deeper prefix), and the root's
        service ("/" prefix; it takes every other path)."""
        deeper = {p.split("/", 2)[1] for p in self._prefixes if p.count("/") > 1}
        single = {segment: s for segment, s in self._first.items() if segment not in deeper}
        return single, deeper, self._root

    def match(self, path: str) -> str | None:
        """The service owning `path`, or None when no prefix covers it."""
        prefixes = self._prefixes
        if self._depth == 1:
            # The usual table (/discovery, /sona, ...): one split, one dict probe, by the first
            # segment ("" before the leading "/").
            parts = path.split("/", 2)
            service = self._first.get(parts[1]) if len(parts) > 1 and not parts[0] else None
            return self._root if service is None else service
        # Ends of the first `depth` segments: "/a/b/c" -> "/a", "/a/b", "/a/b/c".
        ends: list[int] = []
        start = 1
        for _ in range(self._depth):
            end = path.find("/", start)
            if end < 0:
                ends.append(len(path))
                break
            ends.append(end)
            start = end + 1
        for end in reversed(ends):
            service = prefixes.get(path[:end])
            if service is not None:
                return service
        return self._root
