"""The host side of the paged latent cache: which pages are free, which rows hold which, and the prefix cache.

The device holds a pool of N pages of PS slots (`model/cache.PagedCache`); this module decides, on the host,
which page each slot of each request goes to. Pages are split into `groups` equal ranges, one per share of
the mesh's batch axes: a row takes pages only from its own group, so the pages it reads live on the devices
that run it.

Shared prefixes (the prefix cache). A full page of a prompt is identified by its chain key: a hash of the key
of the page before it and its own tokens (and, for prompts with images, a digest of the images), so a key
names a whole prefix, as in vLLM's automatic prefix caching and SGLang's radix cache. A request whose
prompt starts with cached pages names them in its block table instead of recomputing them. Pages are
reference-counted; a finished request's full prompt pages stay cached while unreferenced, and are evicted
least recently used when a request needs pages and none is free.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict


def page_keys(tokens, page_tokens: int, salt: bytes = b"") -> list[bytes]:
    """Chain keys of the full pages of `tokens`: key i names tokens[: (i + 1) * page_tokens] (and the salt)."""
    keys, h = [], hashlib.blake2b(salt, digest_size=16).digest()
    for i in range(len(tokens) // page_tokens):
        block = ",".join(str(int(t)) for t in tokens[i * page_tokens:(i + 1) * page_tokens]).encode()
        h = hashlib.blake2b(h + block, digest_size=16).digest()
        keys.append(h)
    return keys


class PagePool:
    """Free pages, reference counts and cached prefix pages of `n_pages` pages in `groups` equal groups."""

    def __init__(self, n_pages: int, groups: int = 1):
        if n_pages % groups:
            raise ValueError(f"{n_pages} pages do not split into {groups} groups")
        self.per_group = n_pages // groups
        self.free = [list(range(g * self.per_group, (g + 1) * self.per_group))[::-1] for g in range(groups)]
        self.refs = [0] * n_pages
        self.key_of: dict[int, bytes] = {}  # cached page -> its chain key
        self.cached: list[dict[bytes, int]] = [{} for _ in range(groups)]  # key -> page, per group
        self.idle: list[OrderedDict] = [OrderedDict() for _ in range(groups)]  # cached pages nobody holds, LRU first

    def available(self, group: int) -> int:
        """Pages a request could get in `group` now: free ones and cached ones nobody holds."""
        return len(self.free[group]) + len(self.idle[group])

    def take(self, group: int, n: int) -> list[int] | None:
        """n pages for a request (evicting idle cached pages, least recently used first), or None if there are
        not that many."""
        if self.available(group) < n:
            return None
        out = []
        for _ in range(n):
            if self.free[group]:
                page = self.free[group].pop()
            else:
                page, _ = self.idle[group].popitem(last=False)
                del self.cached[group][self.key_of.pop(page)]
            self.refs[page] = 1
            out.append(page)
        return out

    def match(self, group: int, keys: list[bytes]) -> list[int]:
        """The cached pages of the longest prefix of `keys`, each now held once more."""
        out = []
        for key in keys:
            page = self.cached[group].get(key)
            if page is None:
                break
            self.idle[group].pop(page, None)
            self.refs[page] += 1
            out.append(page)
        return out

    def publish(self, group: int, page: int, key: bytes) -> None:
        """Make a filled page findable by its chain key (a page with that key already cached stays the one)."""
        if key not in self.cached[group] and page not in self.key_of:
            self.cached[group][key] = page
            self.key_of[page] = key

    def release(self, group: int, pages: list[int]) -> None:
        """A request lets its pages go: cached ones become idle (kept, evictable), the others free."""
        for page in pages:
            self.refs[page] -= 1
            if self.refs[page] == 0:
                if page in self.key_of:
                    self.idle[group][page] = None
                else:
                    self.free[group].append(page)

    def group_of(self, page: int) -> int:
        return page // self.per_group
