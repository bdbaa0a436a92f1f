"""Command line: gateway serve | check | keygen | probe-issuer | explain | pins | revoke."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from . import __version__, config, logs
from .errors import ConfigError
from .metrics import MULTIPROCESS
from .mint import ALGORITHMS, generate_key, public_jwk
from .probe import DEFAULT_MAX_BYTES, DEFAULT_TIMEOUT

# Seconds uvicorn waits for requests in flight when stopping; with drain_seconds, keep the sum under the
# orchestrator's grace period (deploy/ uses 30 s).
SHUTDOWN_TIMEOUT = 20


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description="Trusted-publishing federation gateway.")
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="serve the gateway with uvicorn",
        description="Load and validate the config, then serve the gateway's HTTP API with uvicorn (uvloop, "
        "httptools). The config is reloaded on SIGHUP and when a watched file changes; SIGTERM drains and stops. "
        "Exit status: 0 after a clean stop, 1 for a bad config, 2 for a usage error or for --workers N > 1 with a "
        "config whose workers could not share state (no redis_url or no signing_key).",
    )
    _config_argument(serve)
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8000, help="TCP port, 1-65535 (default 8000)")
    serve.add_argument(
        "--workers",
        type=_workers,
        default=1,
        help="worker processes (default 1; more than 1 needs redis_url and signing_key)",
    )
    serve.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="overrides [gateway] log_level"
    )

    check = commands.add_parser(
        "check",
        help="validate issuers.toml and the publishers file",
        description="Load and validate issuers.toml and the publishers file as serve would, without serving; with "
        "--workers N, also whether N worker processes could share state; with --replay AUDIT.jsonl, also re-decide "
        "every identity in a JSON audit log against this config and print what would change (identities that would "
        "stop matching, and identities that would newly be granted projects). "
        "Exit status: 0 when valid, 1 with one line per problem (file: [table] field: message), 2 when the audit "
        "log cannot be read, 3 when an identity would newly be granted projects (unless --allow-grants).",
    )
    _config_argument(check)
    check.add_argument(
        "--workers",
        type=_workers,
        default=1,
        help="also check that the config can serve this many worker processes (as serve --workers N)",
    )
    check.add_argument("--replay", type=Path, metavar="AUDIT.jsonl", help="an audit log (JSON lines) to re-decide")
    check.add_argument(
        "--allow-grants", action="store_true", help="with --replay: new grants are expected, exit 0 anyway"
    )

    keygen = commands.add_parser(
        "keygen",
        help="write a new private signing JWK",
        description="Generate a new private signing key for the gateway, as a JWK (JSON) with its thumbprint as "
        "kid, for [gateway] signing_key. Written to --out with mode 0600 (never over an existing file), or to "
        "standard output. Exit status: 0, or 1 when the file cannot be written.",
    )
    keygen.add_argument("--out", type=Path, help="file to write (mode 0600); default: standard output")
    keygen.add_argument("--alg", choices=ALGORITHMS, default="ES256", help="default ES256")

    probe = commands.add_parser(
        "probe-issuer",
        help="check a candidate issuer against the discovery and key rules before trusting it",
        description="Fetch the candidate issuer's discovery document and JWKS as the gateway would (no redirects, "
        "the size cap, one deadline) and print each rule with PASS or FAIL and its evidence. "
        "Exit status: 0 only if every rule holds, 1 otherwise, 2 for a usage error.",
    )
    probe.add_argument("url", metavar="URL", help="the issuer URL exactly as its tokens' iss would say it")
    probe.add_argument(
        "--ca-bundle", type=Path, help="PEM file trusted in addition to the system CAs (as an issuer's ca_bundle)"
    )
    probe.add_argument(
        "--algorithm",
        dest="algorithms",
        action="append",
        choices=sorted(config.ASYMMETRIC_ALGORITHMS),
        help="an algorithm the issuer would be configured with (repeat for several; default RS256)",
    )
    probe.add_argument(
        "--write-jwks",
        type=Path,
        metavar="PATH",
        help="write the keys that pass the key rules to PATH (atomically), for an issuer's jwks_file; "
        "written only when at least one key is usable",
    )
    probe.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"deadline for discovery and JWKS together (default {DEFAULT_TIMEOUT:g}, as fetch_timeout)",
    )
    probe.add_argument(
        "--max-bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        help=f"size cap per document (default {DEFAULT_MAX_BYTES}, as fetch_max_bytes)",
    )

    explain = commands.add_parser(
        "explain",
        help="verify a token as mint-token would, without spending it, and say which publishers match",
        description="Verify an ID token as mint-token would, without spending its jti; print the normalized "
        "identity, the claims the issuer's kind ignores, each candidate publisher field by field, and the "
        "owner_id an operator could pin. Exit status: 0 when a publisher matches, 1 otherwise (invalid token, "
        "no matching publisher, or a bad config).",
    )
    _config_argument(explain)
    explain.add_argument(
        "source", metavar="TOKEN", help="the ID token, or - to read it from standard input (keeps it out of ps)"
    )

    pins = commands.add_parser(
        "pins",
        help="list or forget the ids pinned on first use ([issuers.X] pin_on_first_use)",
        description="Pins live in Redis (redis_url) or else in [gateway] state_file. Exit status: 0 on success, "
        "1 with a message otherwise.",
    )
    pins_commands = pins.add_subparsers(dest="pins_command", required=True)
    pins_list = pins_commands.add_parser(
        "list",
        help="one pin a line",
        description="Print every pin, one a line: issuer, repository, repository_id, owner_id and when it was "
        "pinned. Exit status: 0, or 1 with a message when the state cannot be read.",
    )
    _config_argument(pins_list)
    pins_forget = pins_commands.add_parser(
        "forget",
        help="forget a repository's pin: its next successful mint pins it again",
        description="Forget the pin of one repository (after checking that its new ids are rightful: a re-created "
        "project, a transferred owner); its next successful mint pins the ids it then carries. Exit status: 0, or "
        "1 with a message (no such issuer, no pin for that repository, state unavailable).",
    )
    _config_argument(pins_forget)
    pins_forget.add_argument("--issuer", help="the issuer's name in [issuers]")
    pins_forget.add_argument("--repository", help="the repository path (compared as matching does)")

    revoke = commands.add_parser(
        "revoke",
        help="refuse a repository's mints and uploads at once, on every replica",
        description="Record an emergency revocation: mints for the repository whose ID token was issued inside "
        "the window are refused (invalid-publisher, with the reason), and /legacy/ refuses upload tokens minted "
        "inside it. A bound not given leaves that side open. Every replica honours it within 2 s, without a "
        "reload. Exit status: 0 on success, 1 with a message otherwise.",
    )
    _config_argument(revoke)
    revoke.add_argument("--issuer", help="the issuer's name in [issuers]")
    revoke.add_argument("--repository", help="the repository path (compared as matching does)")
    revoke.add_argument("--since", help="ISO 8601 time with a zone (Z or +HH:MM): tokens issued at or after it")
    revoke.add_argument("--until", help="ISO 8601 time with a zone: tokens issued at or before it")
    revoke.add_argument("--reason", help="why; shown to the refused CI job and in the audit log")
    revoke.add_argument("--list", action="store_true", help="list revocations, one a line starting id=ID")
    revoke.add_argument("--lift", metavar="ID", help="lift the revocation ID")

    commands.add_parser(
        "demo",
        help="run the whole flow locally, no network: a test issuer, a gateway, a token exchanged and verified",
        description="Run the whole flow on loopback with no network: start an HTTPS test issuer with a throwaway "
        "CA and a gateway trusting it, exchange an ID token, show the replay refused, and verify the minted token "
        "as an index would. Needs the testing extra: pip install 'gateway[testing]' (or '.[testing]').",
    )

    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "check":
        return _check(args)
    if args.command == "probe-issuer":
        return _probe(args)
    if args.command == "explain":
        return _explain(args)
    if args.command in ("pins", "revoke"):
        from .admin import pins_command, revoke_command

        settings = _load(args)
        if settings is None:
            return 1
        logs.configure(settings.log_level, settings.log_format)
        return pins_command(settings, args) if args.command == "pins" else revoke_command(settings, args)
    if args.command == "demo":
        try:
            from . import demo
        except ImportError as e:
            # The test issuer's dependencies (trustme) are the testing extra, not part of a server install.
            print(f"gateway demo needs the testing extra ({e}): pip install 'gateway[testing]'", file=sys.stderr)
            return 1
        return demo.main()
    return _keygen(args)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number (got {text!r})") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 1 and 65535 (got {port})")
    return port


def _config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", help=f"path to issuers.toml (default: $GATEWAY_CONFIG, else ./{config.DEFAULT_CONFIG})"
    )


def _load(args: argparse.Namespace, *, uploads: bool = True) -> config.Settings | None:
    path = config.config_path(args.config)
    try:
        return config.load(path, uploads=uploads)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return None


def _workers(value: str) -> int:
    try:
        workers = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number (got {value!r})") from None
    if workers < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {workers})")
    return workers


def fleet_problems(settings: config.Settings, workers: int) -> list[str]:
    """Why `workers` processes could not keep the promises one keeps with this config (one line each)."""
    if workers < 2:
        return []
    assert settings.config_path is not None
    where = f"{settings.config_path.name}: [gateway]"
    problems = []
    if settings.redis_url is None:
        problems.append(
            f"{where} redis_url: --workers {workers} needs a shared Redis: without one each worker keeps its own "
            f"spent token ids, so one ID token could be exchanged {workers} times; set redis_url "
            "(or $GATEWAY_REDIS_URL), or run one worker"
        )
    if settings.signing_key is None:
        problems.append(
            f"{where} signing_key: --workers {workers} needs one signing key for all workers: without it each "
            "signs with an ephemeral key of its own that the others do not publish; set signing_key (make one "
            "with `gateway keygen`), or run one worker"
        )
    return problems


def _check(args: argparse.Namespace) -> int:
    settings = _load(args)
    if settings is None:
        return 1
    problems = fleet_problems(settings, args.workers)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    print(
        f"ok: {len(settings.issuers)} issuer(s) ({', '.join(settings.issuers)}), "
        f"{len(settings.publishers)} publisher(s)"
    )
    if args.replay is not None:
        return _replay(settings, args.replay, allow_grants=args.allow_grants)
    return 0


def _replay(settings: config.Settings, path: Path, *, allow_grants: bool) -> int:
    from .replay import read_audit, replay

    try:
        report = replay(settings, read_audit(path))
    except OSError as e:
        print(f"{path}: cannot be read: {e.strerror}", file=sys.stderr)
        return 2
    sys.stdout.write(report.render())
    if report.new_grants and not allow_grants:
        print("new grants: review them, then rerun with --allow-grants if they are meant", file=sys.stderr)
        return 3
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .serving import OneWriteHttpToolsProtocol

    if args.log_level:
        os.environ["GATEWAY_LOG_LEVEL"] = args.log_level
    settings = _load(args)
    if settings is None:
        return 1
    problems = fleet_problems(settings, args.workers)
    if problems:
        # Refused before anything starts (one line, for a supervisor's log): workers that cannot share state
        # would break the one-mint-per-token promise, or each other's tokens, without a word.
        print("; ".join(problems), file=sys.stderr)
        return 2
    assert settings.config_path is not None
    # Workers are separate processes that each load the config again; the path travels in the environment.
    os.environ["GATEWAY_CONFIG"] = str(settings.config_path.resolve())
    logs.configure(settings.log_level, settings.log_format)
    logging.getLogger("gateway.serve").info("%s", startup_line(settings, args.workers))
    metrics_dir = None
    if args.workers > 1 and not os.environ.get(MULTIPROCESS):
        # Workers keep their counters in files here, so /metrics adds up all of them (metrics.py).
        metrics_dir = os.environ[MULTIPROCESS] = tempfile.mkdtemp(prefix="gateway-metrics-")
    # uvicorn shuts down gracefully on SIGTERM and then re-raises the signal against the handler it found at
    # start; a no-op handler there turns a clean shutdown into exit status 0 instead of death by signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.run(
            "gateway.app:from_environment",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            loop="uvloop",
            # httptools, with each answer in one write (gateway/serving.py).
            http=OneWriteHttpToolsProtocol,
            # Logging is ours (logs.configure, in every worker too): level and format come from the config.
            log_config=None,
            log_level=settings.log_level,
            # Access logs cost a third of the throughput and say nothing the metrics and the audit log do not.
            access_log=False,
            server_header=False,
            # The client address comes from [gateway] trusted_proxies (routes.client_address), not from uvicorn.
            proxy_headers=False,
            # In-flight requests get this long after the drain; keep it inside the orchestrator's grace period.
            timeout_graceful_shutdown=SHUTDOWN_TIMEOUT,
        )
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def startup_line(settings: config.Settings, workers: int) -> str:
    """What this gateway serves with, in one log line: enough to spot a wrong config at a glance, no secret."""
    issuers = ", ".join(f"{name} ({issuer.url})" for name, issuer in settings.issuers.items())
    store = redacted(settings.redis_url) if settings.redis_url else "in-process (no redis_url)"
    upstream = "none"
    if settings.upstream is not None:
        upstream = f"{redacted(settings.upstream.url)} as {settings.upstream.username!r}"
    key = "ephemeral (no signing_key)"
    if settings.signing_key is not None:
        key = f"kid {settings.signing_key.thumbprint()}"
    return (
        f"gateway {__version__} starting: issuers {issuers}; {len(settings.publishers)} publisher(s); "
        f"store {store}; upstream {upstream}; signing key {key}; {workers} worker(s)"
    )


def redacted(url: str) -> str:
    """`url` with any password (user info, or a password= query parameter) replaced by ***."""
    url = re.sub(r"(?<=://)([^/?#]*)@", lambda m: _user(m[1]) + "@", url)
    return re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", url)


def _user(userinfo: str) -> str:
    # redis-py reads `user:password@` and `:password@`; a lone `secret@` may be a password to another parser.
    user, colon, _ = userinfo.partition(":")
    return f"{user}:***" if colon else "***"


def _keygen(args: argparse.Namespace) -> int:
    key = generate_key(args.alg)
    document = json.dumps(key.as_dict(private=True, kid=key.thumbprint()), indent=2) + "\n"
    if args.out is None:
        sys.stdout.write(document)
        return 0
    try:
        # O_EXCL: never overwrite a key in use; 0600: a signing key is a secret.
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"{args.out} exists; refusing to overwrite a signing key", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{args.out}: {e.strerror}", file=sys.stderr)
        return 1
    with os.fdopen(fd, "w") as f:
        f.write(document)
    print(f"wrote {args.out} (kid {key.thumbprint()}, public key: {json.dumps(public_jwk(key))})")
    return 0


def _probe(args: argparse.Namespace) -> int:
    from .probe import ProbeError, probe, write_jwks

    if args.timeout <= 0 or args.max_bytes < 1:
        print("--timeout and --max-bytes must be positive", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(
            probe(
                args.url,
                ca_bundle=args.ca_bundle,
                algorithms=tuple(dict.fromkeys(args.algorithms or ["RS256"])),
                fetch_timeout=args.timeout,
                fetch_max_bytes=args.max_bytes,
            )
        )
    except ProbeError as e:
        print(e, file=sys.stderr)
        return 2
    sys.stdout.write(report.render())
    if args.write_jwks is not None:
        if not report.usable_jwks:
            print(f"{args.write_jwks} not written: the issuer has no usable key", file=sys.stderr)
            return 1
        try:
            write_jwks(args.write_jwks, report.usable_jwks)
        except OSError as e:
            print(f"{args.write_jwks}: cannot be written: {e.strerror}", file=sys.stderr)
            return 1
        kids = ", ".join(repr(entry["kid"]) for entry in report.usable_jwks)
        print(f"wrote {len(report.usable_jwks)} key(s) ({kids}) to {args.write_jwks}")
    return 0 if report.ok else 1


def _explain(args: argparse.Namespace) -> int:
    from .explain import explain

    # explain never uploads, so whoever explains needs no upstream password.
    settings = _load(args, uploads=False)
    if settings is None:
        return 1
    # Surrounding whitespace is the shell's or the file's (a trailing newline), never part of a compact JWS.
    raw = sys.stdin.read() if args.source == "-" else args.source
    code, text = asyncio.run(explain(settings, raw.strip()))
    sys.stdout.write(text)
    return code


if __name__ == "__main__":
    sys.exit(main())
