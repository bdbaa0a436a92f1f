"""gateway.multipart: what a twine upload body says, read strictly, chunk by chunk.

The bodies here are built byte by byte the way twine (requests-toolbelt) sends them, then bent the ways an upload
could mean one thing to the gateway and another to the index behind it (pypiserver, devpi, Warehouse).
"""

from __future__ import annotations

from typing import Any

import pytest
from packaging.version import InvalidVersion, Version

from gateway.errors import InvalidUpload
from gateway.multipart import Form, Upload, boundary_of, distribution, normalize_version

BOUNDARY = "9f2c4e6a8b0d1f3e5a7c9e1b3d5f7a9c"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
SDIST = "sampleproject-1.0.0.tar.gz"
OTHER = "requests-2.99.0.tar.gz"


def part(
    name: str, value: bytes | str, *, filename: str | None = None, extra: str = "", media_type: str | None = None
) -> bytes:
    """One part as twine writes it: files with a bare Content-Type, text fields with none."""
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    headers = f"Content-Disposition: {disposition}\r\n"
    if filename:
        headers += f"Content-Type: {media_type or 'application/octet-stream'}\r\n"
    data = value.encode() if isinstance(value, str) else value
    return f"--{BOUNDARY}\r\n{headers}{extra}\r\n".encode() + data + b"\r\n"


CLOSE = f"--{BOUNDARY}--\r\n".encode()


def fields(name: str = "sampleproject", action: str = "file_upload", version: str = "1.0.0") -> bytes:
    """The metadata fields twine sends before the file, repeated fields included."""
    return b"".join(
        [
            part(":action", action),
            part("protocol_version", "1"),
            part("metadata_version", "2.4"),
            part("name", name),
            part("version", version),
            part("filetype", "sdist"),
            part("pyversion", "source"),
            part("classifiers", "Programming Language :: Python :: 3"),
            part("classifiers", "License :: OSI Approved :: MIT License"),
        ]
    )


def upload_body(
    name: str = "sampleproject",
    filename: str = SDIST,
    content: bytes = b"sdist bytes",
    action: str = "file_upload",
    version: str = "1.0.0",
) -> bytes:
    return fields(name, action, version) + part("content", content, filename=filename) + CLOSE


def with_file(*files: bytes) -> bytes:
    return fields() + b"".join(files) + CLOSE


def replaced(old: bytes | str, new: bytes | str) -> bytes:
    def encode(value: bytes | str) -> bytes:
        return value.encode() if isinstance(value, str) else value

    return upload_body().replace(encode(old), encode(new))


def read(body: bytes, chunk: int | None = None) -> Upload:
    """Feed `body` to a Form (whole, or in `chunk`-byte pieces), finish it, and say what it uploads."""
    form = Form(BOUNDARY.encode())
    size = chunk or len(body) or 1
    for start in range(0, len(body), size):
        form.feed(body[start : start + size])
    form.finish()
    return form.upload()


SDIST_PART = part("content", b"x", filename=SDIST)
FILENAME = f'filename="{SDIST}"'


def bad(id: str, body: bytes, fragment: str) -> Any:
    return pytest.param(body, fragment, id=id)


BAD_UPLOADS = [
    bad("file-of-other-project", upload_body(filename=OTHER), "not a distribution of project"),
    bad("wheel-of-other-project", upload_body(filename="requests-2.99.0-py3-none-any.whl"), "not a distribution"),
    # pypiserver reads this as project "sampleproject"; a last-hyphen split would read "sampleproject-1.0-evil".
    bad("ambiguous-sdist-name", upload_body(filename="sampleproject-1.0-evil-2.0.tar.gz"), "not a wheel or sdist"),
    bad("not-a-distribution", upload_body(filename="sampleproject-1.0.0.exe"), "not a wheel or sdist file name"),
    # Versions start with a digit: pypiserver files the wheel under project "sampleproject-evil".
    bad("wheel-version-not-a-digit", upload_body(filename="sampleproject-evil-1.0-py3-none-any.whl"), "not a wheel"),
    bad("sdist-version-not-a-digit", upload_body(filename="sampleproject-evil.tar.gz"), "not a wheel"),
    bad("duplicate-name", with_file(part("name", "requests"), SDIST_PART), "'name' appears more than once"),
    bad("duplicate-content", with_file(SDIST_PART, part("content", b"y", filename=OTHER)), "'content' appears more"),
    bad("duplicate-action", with_file(part(":action", "file_upload"), SDIST_PART), "':action' appears more"),
    bad("boundary-inside-a-part", upload_body(content=f"a\r\n--{BOUNDARY}X\r\nb".encode()), "ambiguous"),
    bad("part-after-the-end", upload_body() + part("content", b"x", filename=OTHER) + CLOSE, "ambiguous"),
    bad("epilogue", upload_body() + b"epilogue", "after its closing"),
    bad("no-closing-boundary", upload_body().replace(CLOSE, b""), "ended before"),
    bad(
        "unexpected-part-header",
        with_file(part("content", b"x", filename=SDIST, extra="Content-Transfer-Encoding: base64\r\n")),
        "'content-transfer-encoding'",
    ),
    bad(
        "repeated-disposition",
        with_file(part("content", b"x", filename=SDIST, extra='Content-Disposition: form-data; name="x"\r\n')),
        "repeated 'content-disposition'",
    ),
    bad("extended-filename", replaced(FILENAME, f"filename*=UTF-8''{OTHER}"), "Content-Disposition"),
    bad("two-filenames", replaced(FILENAME, f'{FILENAME}; filename="{OTHER}"'), "Content-Disposition"),
    bad("other-action", upload_body(action="submit"), "only ':action' file_upload"),
    bad("no-action", replaced(part(":action", "file_upload"), b""), "only ':action' file_upload"),
    bad("no-name", replaced(part("name", "sampleproject"), b""), "no 'name' field"),
    bad("no-content", fields() + CLOSE, "no 'content' file"),
    bad(
        "file-in-name-field", replaced(part("name", "sampleproject"), part("name", "x", filename=SDIST)), "carry files"
    ),
    bad(
        "unrelated-signature", with_file(SDIST_PART, part("gpg_signature", b"s", filename=OTHER + ".asc")), "is not for"
    ),
    bad("preamble", b"garbage" + upload_body(), "well-formed"),
    bad("field-not-utf-8", replaced(part("name", "sampleproject"), part("name", b"sample\xffproject")), "not UTF-8"),
    bad("field-too-long", upload_body(name="a" * 1025), "longer than 1024 bytes"),
    # devpi (WebOb, cgi) decodes a text part by its Content-Type's charset, and a file name by the file part's.
    bad(
        "charset-on-a-text-part",
        replaced(
            part("name", "sampleproject"),
            part("name", "sampleproject", extra="Content-Type: text/plain; charset=utf-7\r\n"),
        ),
        "'name' must not have a Content-Type",
    ),
    bad(
        "bare-content-type-on-a-text-part",
        replaced(part("version", "1.0.0"), part("version", "1.0.0", extra="Content-Type: text/plain\r\n")),
        "'version' must not have a Content-Type",
    ),
    bad(
        "charset-on-the-file-part",
        with_file(part("content", b"x", filename=SDIST, media_type="application/octet-stream; charset=utf-7")),
        "bare Content-Type",
    ),
    bad(
        "utf-7-file-name",
        upload_body(filename="sampleproject-1.0.0+AGUAdgBpAGw.tar.gz").replace(
            b"application/octet-stream", b"application/octet-stream; charset=utf-7"
        ),
        "bare Content-Type",
    ),
    # devpi registers the `version` field: without these checks good-6.1.tar.gz registered as version "good".
    bad("no-version", replaced(part("version", "1.0.0"), b""), "no 'version' field"),
    bad("duplicate-version", with_file(part("version", "1.0.0"), SDIST_PART), "'version' appears more than once"),
    bad("version-not-pep-440", upload_body(version="sampleproject"), "'version' field 'sampleproject' is not"),
    bad("version-not-the-files", upload_body(version="6.1"), "not of the 'version' field's version '6.1'"),
    bad("version-with-space", upload_body(version=" 1.0.0"), "is not a PEP 440 version"),
    # devpi lower-cases with str.lower(): U+212A KELVIN SIGN becomes "k".
    bad("kelvin-sign-name", upload_body(name="\u212ait", filename="kit-1.0.0.tar.gz"), "is not a project name"),
    bad("name-with-a-space", upload_body(name="sample project"), "is not a project name"),
]


@pytest.mark.parametrize(("body", "fragment"), BAD_UPLOADS)
def test_malformed_or_ambiguous_upload_is_refused(body: bytes, fragment: str) -> None:
    """A body that an index could read differently from the gateway is refused with InvalidUpload naming why."""
    with pytest.raises(InvalidUpload) as refused:
        read(body)
    assert refused.value.status == 400
    assert fragment in refused.value.description


def test_twine_shaped_upload_says_what_it_uploads() -> None:
    """A body as twine sends it yields its project, version and files, with fields outside the decisive few ignored."""
    wheel = "sampleproject-1.0.0-py3-none-any.whl"
    body = (
        fields()
        + part("content", b"wheel bytes", filename=wheel)
        + part("gpg_signature", b"signature", filename=wheel + ".asc")
        + CLOSE
    )
    assert read(body) == Upload("sampleproject", "1.0.0", (("content", wheel), ("gpg_signature", wheel + ".asc")))


@pytest.mark.parametrize("size", [1, 7, len(BOUNDARY) + 1, 4096])
def test_body_in_small_pieces_is_read_the_same(size: int) -> None:
    """Delimiters and headers split across chunks are found: the same upload results, and ambiguity is still caught."""
    assert read(upload_body(content=bytes(range(256)) * 10), size) == read(upload_body(content=bytes(range(256)) * 10))
    with pytest.raises(InvalidUpload, match="ambiguous"):
        read(upload_body(content=f"a\r\n--{BOUNDARY}X\r\nb".encode()), size)


@pytest.mark.parametrize(
    ("version", "filename"),
    [
        pytest.param("1.0.0rc1", "sampleproject-1.0.0rc1.tar.gz", id="same-spelling"),
        pytest.param("1.0.0-RC.1", "sampleproject-1.0.0rc1.tar.gz", id="field-unnormalized"),
        pytest.param("v1.0.0.post2", "sampleproject-1.0.0.post2-py3-none-any.whl", id="leading-v"),
        pytest.param("1!2.0+local.7", "sampleproject-1!2.0+local.7.tar.gz", id="epoch-and-local"),
    ],
)
def test_version_field_matches_the_file_name_after_normalizing(version: str, filename: str) -> None:
    """The `version` field and the file name's version are compared in PEP 440 normal form."""
    assert read(upload_body(version=version, filename=filename)).version == version


def test_a_charset_free_bare_media_type_on_a_file_part_is_accepted() -> None:
    """A file part may carry any bare media type (twine sends application/octet-stream)."""
    body = with_file(part("content", b"x", filename=SDIST, media_type="application/gzip"))
    assert read(body).files == (("content", SDIST),)


VERSIONS = [
    "1.0", "1.0.0", "01.02", "1.0a1", "1.0.alpha.1", "1.0-beta2", "1.0c3", "1.0pre", "1.0-preview-4", "1.0rc",
    "1.0-1", "1.0.post", "1.0-r3", "1.0rev", "1.0.dev", "1.0-dev-5", "1.0a1.post2.dev3", "2!1.0", "0!1.0",
    "1.0+ABC.01-x_y", "V1.0", "1.0.0+0", "1.0a", "1.0_post_1",
]  # fmt: skip
NOT_VERSIONS = ["good", "", "1.0 ", " 1.0", "1..0", "1.0+", "1.0-", "\u0661.0", "1.0\n", "1.0-evil", "1.0+a+b", "1.0.x"]


@pytest.mark.parametrize("version", VERSIONS)
def test_normalize_version_agrees_with_packaging(version: str) -> None:
    """normalize_version gives the normal form `packaging` gives, for every kind of PEP 440 segment."""
    assert normalize_version(version) == str(Version(version))


@pytest.mark.parametrize("version", NOT_VERSIONS)
def test_normalize_version_refuses_what_is_not_a_version(version: str) -> None:
    """Strings that are not PEP 440 versions (whitespace and non-ASCII digits included) have no normal form."""
    assert normalize_version(version) is None
    if version.strip() == version and version.isascii():
        with pytest.raises(InvalidVersion):
            Version(version)


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        pytest.param("sampleproject-1.0.0.tar.gz", ("sampleproject", "1.0.0"), id="sdist"),
        pytest.param("Sample_Project-1.0.zip", ("sample-project", "1.0"), id="zip-sdist-normalized"),
        pytest.param("sampleproject-1.0-1-py3-none-any.whl", ("sampleproject", "1.0"), id="wheel-with-build-tag"),
        pytest.param("sample-project-1.0.tar.gz", None, id="hyphen-in-project"),
        pytest.param("sampleproject-1.0.tar.bz2", None, id="other-archive"),
        pytest.param("sampleproject-1.0-py3-none.whl", None, id="short-wheel"),
    ],
)
def test_distribution_reads_project_and_version_from_file_names(filename: str, expected: object) -> None:
    """Wheel and sdist names give (normalized project, version); a name some index could split otherwise gives None."""
    assert distribution(filename) == expected


@pytest.mark.parametrize(
    ("content_type", "encoding", "expected"),
    [
        pytest.param(CONTENT_TYPE, "identity", BOUNDARY.encode(), id="twine"),
        pytest.param(f'multipart/form-data; boundary="{BOUNDARY}"', "identity", BOUNDARY.encode(), id="quoted"),
        pytest.param(f"multipart/form-data;boundary={BOUNDARY}", "IDENTITY", BOUNDARY.encode(), id="no-space"),
        pytest.param("application/json", "identity", None, id="not-multipart"),
        pytest.param(f"{CONTENT_TYPE}; boundary=other", "identity", None, id="two-boundaries"),
        pytest.param("multipart/form-data", "identity", None, id="no-boundary"),
        pytest.param(CONTENT_TYPE, "gzip", None, id="content-encoded"),
        *(
            pytest.param(f"multipart/form-data; boundary=X{c}Y", "identity", None, id=f"tspecial-{c}")
            for c in "(),/:=?"
        ),
    ],
)
def test_boundary_of_accepts_only_a_plain_multipart_form(content_type: str, encoding: str, expected: object) -> None:
    """Only an unencoded multipart/form-data with one tspecial-free boundary parameter gives a boundary."""
    if expected is None:
        with pytest.raises(InvalidUpload):
            boundary_of(content_type, encoding)
    else:
        assert boundary_of(content_type, encoding) == expected
