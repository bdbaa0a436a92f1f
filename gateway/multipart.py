"""What a twine upload says: a strict, streaming reader of its multipart/form-data body.

The upstream index parses the same bytes again with its own parser (bottle in pypiserver; WebOb and the `cgi`
module in devpi; Warehouse's), and decides from them what it stores. So this reader accepts only what every one of
them reads the same way, and refuses the rest with `InvalidUpload` (400) naming the problem:

- the request's Content-Type: one `boundary` parameter, free of RFC 2045's tspecials (bottle splits at ",");
- each part: one `Content-Disposition: form-data; name="..."` with at most one plain `filename="..."` (no `*=`,
  no escapes), and nothing else but a Content-Type on file parts, which must be a bare media type. A parameter
  such as `charset=utf-7` makes devpi decode the file name in that charset (`good-7.3+AGUAdgBpAGw.tar.gz` is
  stored as `good-7.3evil.tar.gz`), and a Content-Type on a text part makes it decode the value so;
- `:action`, `name`, `version`, `content` and `gpg_signature` at most once each, and the boundary string in the
  body exactly where a part begins or the body ends: file content never holds it by chance (clients choose random
  boundaries), so a second occurrence is a part that some parser would see and another would not;
- `name` an ASCII project name before it is normalized (devpi lower-cases with `str.lower()`, under which the
  KELVIN SIGN becomes "k"); `version` a PEP 440 version equal, normalized, to every file's (devpi registers the
  `version` field, pypiserver the file name's);
- each file name an unambiguous wheel or sdist name of that project (pypiserver reads the project and version from
  the file name, and nothing else).

`Form` reads the body chunk by chunk (the caller spools it), keeping only the few short fields that decide where
the upload goes; `Form.upload()` then says what the whole body uploads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser

from .errors import InvalidUpload
from .publishers import normalize_project

__all__ = ["Form", "Upload", "boundary_of", "distribution", "normalize_version"]

# Fields whose values decide where the upload goes; each may appear once, and their values are kept.
DECISIVE = frozenset({":action", "name", "version"})
# The only parts that may carry files: the distribution and its detached signature, as twine sends them.
FILE_FIELDS = frozenset({"content", "gpg_signature"})
MAX_VALUE = 1024

# Exactly what twine (requests-toolbelt), urllib3 and reqwest send, and nothing a parser could read two ways.
_CONTENT_TYPE = re.compile(r"multipart/form-data;\s?boundary=(\"?)([0-9A-Za-z'+_.-]{1,70})\1")
_DISPOSITION = re.compile(r'form-data; ?name="([A-Za-z0-9_:.-]{1,100})"(?:; ?filename="([A-Za-z0-9_.+!-]{1,255})")?')
# type/subtype and nothing after it (RFC 6838 restricted names).
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")
# PEP 508 project names, spelled out in ASCII: `re.IGNORECASE` would let `[a-z]` match U+212A KELVIN SIGN.
_PROJECT_NAME = re.compile(r"[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9._-]*[A-Za-z0-9]")
# Names the PEP 625 and wheel specs produce: the project part has no "-", so where it ends is never in doubt.
# (pypiserver reads "good-1.0-evil-2.0.tar.gz" as project "good"; a looser rule would read "good-1.0-evil".)
# Versions start with a digit, as pypiserver's own file-name rule assumes ("sampleproject-evil-1.0-..." would be
# project "sampleproject-evil" to it).
_SDIST = re.compile(r"([A-Za-z0-9_.]+)-([0-9][A-Za-z0-9_.+!]*)\.(?:tar\.gz|zip)")
_WHEEL = re.compile(
    r"([A-Za-z0-9_.]+)-([0-9][A-Za-z0-9_.+!]*)(?:-[0-9][A-Za-z0-9_.]*)?-[A-Za-z0-9_.]+-[A-Za-z0-9_.]+-[A-Za-z0-9_.]+\.whl"
)
# PEP 440's own pattern (as `packaging` spells it), ASCII only.
_VERSION = re.compile(
    r"""
    v?
    (?:(?P<epoch>[0-9]+)!)?
    (?P<release>[0-9]+(?:\.[0-9]+)*)
    (?P<pre>[-_.]?(?P<pre_l>alpha|a|beta|b|preview|pre|c|rc)[-_.]?(?P<pre_n>[0-9]+)?)?
    (?P<post>(?:-(?P<post_n1>[0-9]+))|(?:[-_.]?(?P<post_l>post|rev|r)[-_.]?(?P<post_n2>[0-9]+)?))?
    (?P<dev>[-_.]?(?P<dev_l>dev)[-_.]?(?P<dev_n>[0-9]+)?)?
    (?:\+(?P<local>[a-z0-9]+(?:[-_.][a-z0-9]+)*))?
    """,
    re.VERBOSE | re.IGNORECASE | re.ASCII,
)
_PRE = {"alpha": "a", "a": "a", "beta": "b", "b": "b", "c": "rc", "pre": "rc", "preview": "rc", "rc": "rc"}


def boundary_of(content_type: str, content_encoding: str = "identity") -> bytes:
    """The boundary of an upload's Content-Type, if it is one every index reads the same way."""
    if content_encoding.lower() != "identity":
        raise InvalidUpload("the upload must not be content-encoded")
    match = _CONTENT_TYPE.fullmatch(content_type)
    if match is None:
        raise InvalidUpload("the upload must be multipart/form-data with one boundary parameter, as twine sends")
    return match.group(2).encode("ascii")


def normalize_version(version: str) -> str | None:
    """A PEP 440 version in its normal form (`packaging`'s `str(Version(v))`), or None if it is not one."""
    match = _VERSION.fullmatch(version) if version.isascii() else None
    if match is None:
        return None
    parts = []
    if match["epoch"] and int(match["epoch"]):
        parts.append(f"{int(match['epoch'])}!")
    parts.append(".".join(str(int(number)) for number in match["release"].split(".")))
    if match["pre"]:
        parts.append(f"{_PRE[match['pre_l'].lower()]}{int(match['pre_n'] or 0)}")
    if match["post"]:
        parts.append(f".post{int(match['post_n1'] or match['post_n2'] or 0)}")
    if match["dev"]:
        parts.append(f".dev{int(match['dev_n'] or 0)}")
    if match["local"]:
        local = re.split(r"[-_.]", match["local"])
        parts.append("+" + ".".join(str(int(p)) if p.isdigit() else p.lower() for p in local))
    return "".join(parts)


def distribution(filename: str) -> tuple[str, str] | None:
    """(normalized project, version as spelled) of a wheel or sdist file name, or None if it is ambiguous."""
    match = _WHEEL.fullmatch(filename) or _SDIST.fullmatch(filename)
    return (normalize_project(match.group(1)), match.group(2)) if match else None


@dataclass(frozen=True, slots=True)
class Upload:
    """What a well-formed upload uploads: the project as the form names it, its version, and (field, file name)s."""

    project: str
    version: str
    files: tuple[tuple[str, str], ...]


@dataclass(slots=True)
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    name: str = ""
    filename: str | None = None
    value: bytearray | None = None


class Form:
    """A multipart upload read incrementally and strictly: `feed` each chunk, then `finish`, then `upload()`."""

    def __init__(self, boundary: bytes) -> None:
        self.delimiter = b"--" + boundary
        self.fields: dict[str, str] = {}
        self.files: list[tuple[str, str]] = []
        self.parts = 0
        self.delimiters = 0
        self.ended = False
        self._seen: set[str] = set()
        self._part = _Part()
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._close = self.delimiter + b"--"
        self._carry = b""
        self._tail = b""
        self._error: InvalidUpload | None = None
        self._parser = MultipartParser(
            boundary,
            callbacks={
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value_data,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
                "on_end": self._end,
            },
            max_header_count=4,
            max_header_size=1024,
        )

    def feed(self, chunk: bytes) -> None:
        self._count_delimiters(chunk)
        self._tail = (self._tail + chunk)[-len(self._close) - 2 :]
        try:
            # After the closing delimiter the parser discards what it is given; finish() refuses that epilogue.
            self._parser.write(chunk)
        except MultipartParseError as e:
            raise InvalidUpload(f"the upload is not a well-formed multipart/form-data body ({e})") from None
        if self._error is not None:
            raise self._error

    def finish(self) -> None:
        if not self.ended:
            raise InvalidUpload("the upload ended before its closing multipart boundary")
        if not (self._tail.endswith(self._close) or self._tail.endswith(self._close + b"\r\n")):
            raise InvalidUpload("the upload has data after its closing multipart boundary")
        if self.delimiters != self.parts + 1:
            raise InvalidUpload("the multipart boundary string occurs where no part begins; the upload is ambiguous")

    def upload(self) -> Upload:
        """What the finished form uploads, if it is one file_upload of one project's files of one version."""
        action = self.fields.get(":action")
        if action != "file_upload":
            raise InvalidUpload(f"only ':action' file_upload is supported (got {action!r})")
        project = self.fields.get("name")
        if not project:
            raise InvalidUpload("the upload has no 'name' field naming its project")
        if not _PROJECT_NAME.fullmatch(project):
            raise InvalidUpload(f"the 'name' field {project!r} is not a project name (ASCII letters, digits, . _ -)")
        version = self.fields.get("version")
        if version is None:
            raise InvalidUpload("the upload has no 'version' field")
        normal = normalize_version(version)
        if normal is None:
            raise InvalidUpload(f"the 'version' field {version!r} is not a PEP 440 version")
        files = dict(self.files)
        if "content" not in files:
            raise InvalidUpload("the upload has no 'content' file")
        for name, filename in self.files:
            file = filename.removesuffix(".asc") if name == "gpg_signature" else filename
            if name == "gpg_signature" and file != files["content"]:
                raise InvalidUpload(f"the signature {filename!r} is not for {files['content']!r}")
            found = distribution(file)
            if found is None:
                raise InvalidUpload(
                    f"{file!r} is not a wheel or sdist file name as the packaging specs define them "
                    "(the project part normalized, with '_' for '-'; sdists as .tar.gz or .zip)"
                )
            if found[0] != normalize_project(project):
                raise InvalidUpload(f"the file {file!r} is not a distribution of project {project!r}")
            if normalize_version(found[1]) != normal:
                raise InvalidUpload(f"the file {file!r} is not of the 'version' field's version {version!r}")
        return Upload(project, version, tuple(self.files))

    def _count_delimiters(self, chunk: bytes) -> None:
        # The carry is one byte shorter than the delimiter, so each match found here includes a new byte.
        window = self._carry + chunk
        start = window.find(self.delimiter)
        while start != -1:
            self.delimiters += 1
            start = window.find(self.delimiter, start + 1)
        self._carry = window[-(len(self.delimiter) - 1) :]

    def _fail(self, reason: str) -> None:
        # Callbacks cannot raise through the parser cleanly; remember the first problem and stop feeding it.
        if self._error is None:
            self._error = InvalidUpload(reason)

    def _part_begin(self) -> None:
        self.parts += 1
        self._part = _Part()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        name = bytes(self._header_name).decode("latin-1").lower()
        value = bytes(self._header_value).decode("latin-1")
        self._header_name.clear()
        self._header_value.clear()
        if name not in ("content-disposition", "content-type") or name in self._part.headers:
            self._fail(f"a part of the upload has an unexpected or repeated {name!r} header")
        self._part.headers[name] = value

    def _headers_finished(self) -> None:
        part = self._part
        disposition = _DISPOSITION.fullmatch(part.headers.get("content-disposition", ""))
        if disposition is None:
            self._fail('each part needs one Content-Disposition: form-data; name="..." (with a plain filename)')
            return
        part.name, part.filename = disposition.group(1), disposition.group(2)
        content_type = part.headers.get("content-type")
        if content_type is not None:
            if part.filename is None:
                self._fail(f"the text field {part.name!r} must not have a Content-Type (it could name a charset)")
            elif not _MEDIA_TYPE.fullmatch(content_type):
                self._fail(
                    f"the file part {part.name!r} may have a bare Content-Type like application/octet-stream, "
                    "without parameters"
                )
        if part.name in DECISIVE | FILE_FIELDS:
            if part.name in self._seen:
                self._fail(f"the field {part.name!r} appears more than once")
            self._seen.add(part.name)
        if part.filename is not None:
            if part.name not in FILE_FIELDS:
                self._fail(f"only {', '.join(sorted(FILE_FIELDS))} may carry files, not {part.name!r}")
            self.files.append((part.name, part.filename))
        elif part.name in DECISIVE:
            part.value = bytearray()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        value = self._part.value
        if value is not None:
            value += data[start:end]
            if len(value) > MAX_VALUE:
                self._fail(f"the field {self._part.name!r} is longer than {MAX_VALUE} bytes")
                self._part.value = None

    def _part_end(self) -> None:
        part = self._part
        if part.value is None:
            return
        try:
            self.fields[part.name] = part.value.decode("utf-8")
        except UnicodeDecodeError:
            self._fail(f"the field {part.name!r} is not UTF-8")

    def _end(self) -> None:
        self.ended = True
