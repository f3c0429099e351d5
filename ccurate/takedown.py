"""Takedowns and removals: what must never be in a release again.

Two persistent lists live in the catalog directory, beside the catalog itself,
so they survive a wiped work directory:

- `takedowns.jsonl`: the takedown list, one validated JSON object a line
  (`id, kind, value, reason, added_at, added_by`, plus `phash`, `pixel_sha256`,
  `radius` and `source` for images). Kinds: `url` (image URL), `page_url`,
  `domain` (the host and its subdomains, image or page URL), `author`
  (case-insensitive), `sha256` (of the downloaded file, or of the released
  bytes), `phash` (64-bit perceptual hash, near matches within a radius) and
  `image` (a file: its sha256, pixel sha256 and phash). `ccurate takedown add`
  appends under an flock; an entry that is already listed is not added again.
  URLs and hosts match however they are spelled (`url_key`, `canonical_host`:
  http/https, default port, trailing dot, IDNA 2008, IP literal forms,
  escapes, dot-segments).
- `removals/*.parquet`: every sample a rebuild removed (takedown or opt-out),
  with its hashes. Later rebuilds drop those keys, the same image bytes or
  pixels anywhere, and near copies (pHash within the radius), so a removed
  image does not come back under another URL.

Matching a release input against these lists is `ccurate.takedown_match`; the
opt-out re-check of released samples is `ccurate.optout_recheck`.
"""

from __future__ import annotations

import fcntl
import getpass
import hashlib
import io
import ipaddress
import json
import os
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import idna
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from ccurate.shardio import write_table_atomic

TAKEDOWN_FILE = "takedowns.jsonl"
REMOVALS_DIR = "removals"

REASONS: dict[str, str] = {
    "takedown": "matches an entry of the takedown list (URL, page, domain, author, hash, or a "
    "near copy of an image), or is a copy of a sample removed for a takedown",
    "optout_<signal>": "the source now opts out (re-checked on schedule); the reason names the "
    "signal, as at ingest (optout_x_robots_tag, optout_robots_txt, optout_tdmrep, "
    "optout_meta_robots)",
}

Kind = Literal["url", "page_url", "domain", "author", "sha256", "phash", "image"]
KINDS: tuple[str, ...] = ("url", "page_url", "domain", "author", "sha256", "phash", "image")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
HEX16 = re.compile(r"^[0-9a-f]{16}$")
_LABEL = r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
_HOST = re.compile(rf"^{_LABEL}(\.{_LABEL})*$|^\[[0-9a-f:.]+\]$")
_SCHEME_HOST = r"^([A-Za-z][A-Za-z0-9+.\-]*://[^/?#]*)"


class TakedownError(ValueError):
    """A takedown entry or list that cannot be used; the message says where and why."""


# --------------------------------------------------------------------------- normalising


def normalize_url(url: str) -> str:
    """`scheme://host` lower-cased, fragment dropped: the stored form of a URL entry.

    Kept as it is because an entry's id is a hash of it (a listed id must keep
    matching); matching compares `url_key`s, which fold the other spellings."""
    url = url.strip()
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if parts is None or parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise TakedownError(f"not an http(s) URL with a host: {url!r}")
    m = re.match(_SCHEME_HOST, url)
    assert m is not None
    out = m.group(1).lower() + url[m.end() :]
    return out.split("#", 1)[0]


def canonical_host(host: str) -> str | None:
    """A host as DNS resolves it: lower-case, no trailing dot, IDNA (punycode) form.

    Non-ASCII names take UTS-46 mapping and IDNA 2008 (non-transitional, as browsers:
    `faß.de` is `xn--fa-hia.de`, never `fass.de`, another domain); full-width dots map
    to dots. IP literals take one form (`ipaddress`): IPv6 compressed, an IPv4-mapped
    IPv6 address as its IPv4, and the IPv4 spellings the resolver (`inet_aton`) reads as
    one address (`16909060`, `0x1.2.3.4`, `01.02.03.04` are `1.2.3.4`). None for what
    is not a plain host name or IP literal (a `%`, an empty label, characters no host
    has): callers deciding on a host must then fail closed.
    """
    h = host.strip().lower().rstrip(".")
    if not h.isascii():
        try:
            mapped = idna.uts46_remap(h, std3_rules=False, transitional=False)
            h = ".".join(
                x if x.isascii() else idna.alabel(x).decode("ascii")
                for x in mapped.rstrip(".").split(".")
            ).lower()
        except (idna.IDNAError, UnicodeError, ValueError):
            return None
    if not _HOSTNAME.match(h):
        return None
    if ":" in h:
        try:
            ip = ipaddress.IPv6Address(h)
        except ValueError:
            return None
        return str(ip.ipv4_mapped) if ip.ipv4_mapped is not None else ip.compressed
    if _IPV4_SPELLING.match(h):
        try:
            return socket.inet_ntoa(socket.inet_aton(h))
        except OSError:  # out of range: a name to the resolver, as it is
            return h
    return h


def url_host(url: str | None, unescape: bool = False) -> str | None:
    """The `canonical_host` of a URL; None without one. `unescape` decodes escapes in it
    first, as browsers do (takedowns: err towards matching); else a `%` makes it None."""
    if not url:
        return None
    try:
        host = urlsplit(url.strip()).hostname
    except ValueError:
        return None
    if host and unescape:
        host = unquote(host)
    return canonical_host(host) if host else None


def url_key(url: str, page: bool = False) -> str:
    """The form URL takedowns are matched in (entries and rows alike): one per resource.

    RFC 3986 6.2.2-6.2.3: http and https folded (`//host/path`), default ports and
    userinfo dropped, host canonical (`canonical_host`, escapes in it decoded), path
    and query escaped as the fetcher sends them, escapes of unreserved characters
    decoded and others upper-cased, dot-segments removed, empty path `/`, empty
    query and fragment dropped. `page`: a trailing slash is ignored (`/post/` is
    `/post`). Path case and query values are kept: they may name another resource. The
    query's parameters are sorted and tracking parameters (`utm_*`, `fbclid`, `gclid`,
    ...) dropped: neither names another resource, and a takedown of a page must also
    remove the copy a newsletter or social link led the crawler to (matching more is
    the safe side of a takedown).
    """
    url = url.strip()
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        port = parts.port
    except ValueError as e:  # bad port, bad IPv6 literal
        raise TakedownError(f"unparsable URL {url!r}: {e}") from None
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise TakedownError(f"not an http(s) URL with a host: {url!r}")
    host = canonical_host(unquote(parts.hostname))
    if host is None:
        raise TakedownError(f"not a host name in {url!r}")
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        netloc += f":{port}"
    path = _remove_dot_segments(normalize_escapes(parts.path)) or "/"
    if page and len(path) > 1:
        path = path.removesuffix("/")
    query = _query_key(normalize_escapes(parts.query))
    return f"//{netloc}{path}?{query}" if query else f"//{netloc}{path}"


# parameters that say where a visitor came from, never which resource (a link
# shortener's or a mail campaign's), as browsers' and Firefox's tracking strippers list them
_TRACKING = re.compile(
    r"(utm_[a-z_]+|fbclid|gclid|gclsrc|dclid|gbraid|wbraid|msclkid|twclid|igshid|"
    r"mc_cid|mc_eid|_hsenc|_hsmi|mkt_tok|yclid|ref_src|oly_anon_id|oly_enc_id|vero_id)",
    re.IGNORECASE,
)


def _query_key(query: str) -> str:
    """The query without tracking parameters, its parameters sorted (stable, by name)."""
    if not query:
        return ""
    params = [p for p in query.split("&") if p and not _TRACKING.fullmatch(p.partition("=")[0])]
    return "&".join(sorted(params, key=lambda p: p.partition("=")[0]))


_DEFAULT_PORTS = {"http": 80, "https": 443}
# unanchored patterns, shared with the vectorised prefilters of `takedown_match`
HOST_LABELS = r"[a-z0-9_-]+(\.[a-z0-9_-]+)*"  # a plain (lower-case ASCII) host name
# what `inet_aton` (and so the fetcher's resolver) reads as an IPv4 address: 1 to 4
# numbers, decimal, octal (`0` first) or hex (`0x`); a name that ends in a number
IPV4_SPELLING = r"(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}"
NOT_SENT_AS_IS = r"[^\x21-\x7e]"  # what ingest.guard escapes in a request line
_HOSTNAME = re.compile(rf"^{HOST_LABELS}$|^[0-9a-f:.]*:[0-9a-f:.]*$")
_IPV4_SPELLING = re.compile(rf"^{IPV4_SPELLING}$")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_NOT_SENT_AS_IS = re.compile(NOT_SENT_AS_IS)


def normalize_escapes(s: str) -> str:
    """Percent-escapes in one form: non-ASCII and spaces escaped (UTF-8), unreserved
    characters decoded, the hex of the rest upper-cased (RFC 3986 6.2.2.1-2)."""
    if _NOT_SENT_AS_IS.search(s):
        s = _NOT_SENT_AS_IS.sub(
            lambda m: "".join(f"%{b:02X}" for b in m.group().encode("utf-8", "surrogatepass")), s
        )
    if "%" not in s:
        return s

    def one(m: re.Match[str]) -> str:
        c = chr(int(m.group(1), 16))
        return c if c in _UNRESERVED else "%" + m.group(1).upper()

    return _ESCAPE.sub(one, s)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 on an absolute path: `/a/./b/../c` -> `/a/c`."""
    if "." not in path:
        return path
    segs = path.split("/")
    out: list[str] = []
    for i, seg in enumerate(segs):
        last = i == len(segs) - 1
        if seg == "..":
            if len(out) > 1:
                out.pop()
            if last:
                out.append("")
        elif seg == ".":
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/".join(out)


def normalize_domain(value: str) -> str:
    """`example.com`, `*.example.com`, `.example.com` or a URL -> `example.com` (IDNA form)."""
    v = value.strip().lower()
    if "://" in v:
        try:
            v = urlsplit(v).hostname or ""
        except ValueError:
            v = ""
    v = v.removeprefix("*.").lstrip(".")
    # [IPv6] and IPv4 spellings as listed (an entry's id hashes its value); matching
    # compares them in `canonical_host` form
    host = v if v.startswith("[") or _IPV4_SPELLING.match(v) else canonical_host(v) if v else None
    if host is None or not _HOST.match(host):
        raise TakedownError(f"not a domain name: {value!r} (expected e.g. example.com)")
    return host


def normalize_author(value: str) -> str:
    v = " ".join(value.split()).casefold()
    if not v:
        raise TakedownError("empty author")
    return v


def _hex(value: str, pattern: re.Pattern[str], what: str) -> str:
    v = value.strip().lower()
    if not pattern.match(v):
        raise TakedownError(f"not a {what}: {value!r}")
    return v


def _normalize(kind: str, value: str) -> str:
    if kind in ("url", "page_url"):
        return normalize_url(value)
    if kind == "domain":
        return normalize_domain(value)
    if kind == "author":
        return normalize_author(value)
    if kind in ("sha256", "image"):
        return _hex(value, HEX64, "sha256 (64 hex digits)")
    if kind == "phash":
        return _hex(value, HEX16, "64-bit perceptual hash (16 hex digits)")
    raise TakedownError(f"unknown takedown kind {kind!r}; expected one of {', '.join(KINDS)}")


# --------------------------------------------------------------------------- entries


def entry_id(kind: str, value: str) -> str:
    """Stable id: the same (kind, value) is one entry, however often it is requested."""
    return "td-" + hashlib.sha256(f"{kind}\0{value}".encode()).hexdigest()[:12]


class TakedownEntry(BaseModel):
    """One line of `takedowns.jsonl` (validated on load and on add)."""

    model_config = ConfigDict(extra="forbid")

    id: str = ""
    kind: Kind
    value: str
    reason: str = "takedown request"
    added_at: str = ""
    added_by: str = ""
    phash: str | None = None
    pixel_sha256: str | None = None
    radius: int | None = None
    source: str | None = None

    @field_validator("radius")
    @classmethod
    def _radius(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v <= 32:
            raise ValueError("radius must be within 0..32 bits")
        return v

    @model_validator(mode="after")
    def _check(self) -> TakedownEntry:
        self.value = _normalize(self.kind, self.value)
        if self.phash is not None:
            self.phash = _hex(self.phash, HEX16, "phash (16 hex digits)")
        if self.pixel_sha256 is not None:
            self.pixel_sha256 = _hex(self.pixel_sha256, HEX64, "pixel_sha256")
        if self.kind == "image" and self.phash is None:
            raise ValueError("an image entry needs its phash")
        if not self.reason.strip():
            raise ValueError("reason must not be empty")
        want = entry_id(self.kind, self.value)
        if self.id and self.id != want:
            raise ValueError(f"id {self.id!r} does not match kind and value (expected {want})")
        self.id = want
        return self


def _now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def _who() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no user name in some containers
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def make_entry(
    kind: str, value: str, reason: str | None = None, added_by: str | None = None, **more: Any
) -> TakedownEntry:
    """Validate one takedown; raises TakedownError with a message naming the problem."""
    try:
        return TakedownEntry(
            kind=kind,
            value=value,
            reason=reason or "takedown request",
            added_at=_now_iso(),
            added_by=added_by or _who(),
            **more,
        )
    except ValidationError as err:  # pydantic wraps the TakedownErrors of the validators
        raise TakedownError(_first_error(err)) from None


def _first_error(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = ".".join(str(p) for p in e["loc"])
    msg = str(e["msg"]).removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


@dataclass(frozen=True)
class ImageHashes:
    """File sha256, decoded-pixel sha256 and pHash of an image file (as ingest hashes it)."""

    sha256: str
    pixel_sha256: str
    phash: str


def hash_image_bytes(data: bytes) -> ImageHashes:
    """Hashes as ingest makes them: EXIF orientation applied, RGB, pHash of the pixels."""
    from PIL import Image

    from ccurate.filters.hashing import compute_hashes
    from ccurate.pixels import upright_rgb

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            pix, ph = compute_hashes(upright_rgb(im))
    except Exception as e:  # any decoder failure: say which and why
        raise TakedownError(f"cannot decode image: {type(e).__name__}: {e}") from None
    return ImageHashes(hashlib.sha256(data).hexdigest(), pix, ph)


def hash_image_file(path: str | Path) -> ImageHashes:
    p = Path(path)
    if not p.is_file():
        raise TakedownError(f"image file not found: {p}")
    try:
        return hash_image_bytes(p.read_bytes())
    except TakedownError as e:
        raise TakedownError(f"{p}: {e}") from None


def image_entry(
    path: str | Path,
    reason: str | None = None,
    added_by: str | None = None,
    radius: int | None = None,
) -> TakedownEntry:
    """A takedown for an image file: its file sha256, pixel sha256 and pHash (near copies)."""
    h = hash_image_file(path)
    return make_entry(
        "image",
        h.sha256,
        reason,
        added_by,
        phash=h.phash,
        pixel_sha256=h.pixel_sha256,
        radius=radius,
        source=Path(path).name,
    )


# --------------------------------------------------------------------------- the list file


class TakedownList:
    """`catalog_dir/takedowns.jsonl`: validated on every load; appends hold an flock."""

    def __init__(self, catalog_dir: str | Path) -> None:
        self.dir = Path(catalog_dir)
        self.path = self.dir / TAKEDOWN_FILE

    def load(self) -> list[TakedownEntry]:
        """The validated list; waits for an `add` in progress (a shared flock), so a rebuild
        starting meanwhile never reads a half-written line."""
        if not self.path.exists():
            return []
        with open(self.path, "rb") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH)
            return load_entries(self.path)

    def add(self, entries: Iterable[TakedownEntry]) -> list[tuple[TakedownEntry, bool]]:
        """Append the entries not yet listed; returns (entry, added?) for each, in order."""
        self.dir.mkdir(parents=True, exist_ok=True)
        out: list[tuple[TakedownEntry, bool]] = []
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            have = {e.id for e in load_entries(self.path)}  # not load(): its LOCK_SH would wait
            lines = []
            for e in entries:
                new = e.id not in have
                out.append((e, new))
                if new:
                    have.add(e.id)
                    lines.append(e.model_dump_json(exclude_none=True) + "\n")
            if lines:
                with open(self.path, "rb") as fh:  # a previous writer died mid-line?
                    fh.seek(0, os.SEEK_END)
                    if fh.tell():
                        fh.seek(-1, os.SEEK_END)
                        if fh.read(1) != b"\n":
                            lines.insert(0, "\n")
                os.write(fd, "".join(lines).encode())
                os.fsync(fd)
        finally:
            os.close(fd)  # releases the flock
        return out


def load_entries(path: str | Path) -> list[TakedownEntry]:
    """Every entry of a takedown file; a bad line is an error naming file and line."""
    entries: list[TakedownEntry] = []
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TakedownError(
                    f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start} of the line)"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise TakedownError("not a JSON object")
                entries.append(TakedownEntry.model_validate(obj))
            except json.JSONDecodeError as e:
                raise TakedownError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            except ValidationError as e:
                raise TakedownError(f"{path}:{n}: {_first_error(e)}") from None
            except TakedownError as e:
                raise TakedownError(f"{path}:{n}: {e}") from None
    return entries


# --------------------------------------------------------------------------- removals

REMOVAL_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("page_url", pa.string()),
        ("sha256", pa.string()),
        ("pixel_sha256", pa.string()),
        ("phash", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("generation", pa.int32()),
        ("removed_at", pa.string()),
    ]
)


def removal_files(catalog_dir: str | Path) -> list[Path]:
    d = Path(catalog_dir) / REMOVALS_DIR
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob("*.parquet") if not p.name.startswith("."))


def load_removals(catalog_dir: str | Path, exclude: Iterable[Path] = ()) -> pa.Table:
    """Every removal recorded so far (one table; empty when none)."""
    skip = {Path(p).resolve() for p in exclude}
    files = [p for p in removal_files(catalog_dir) if p.resolve() not in skip]
    if not files:
        return REMOVAL_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(f, schema=REMOVAL_SCHEMA) for f in files])


def write_removals(path: str | Path, table: pa.Table) -> None:
    write_table_atomic(path, table.select(REMOVAL_SCHEMA.names).cast(REMOVAL_SCHEMA))
