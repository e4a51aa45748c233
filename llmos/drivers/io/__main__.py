"""The io driver process: `python -m llmos.drivers.io --endpoint E --name N --socket PATH`.

Serves the HTTP API on a Unix socket (mode 0600) and reports Ready once it listens. Exits
on SIGTERM/SIGINT, on the kernel's Shutdown, or when the kernel dies (DriverRuntime).
Connection limits (cap, header and send deadlines, keep-alive, header sizes): limits.py.
"""
from __future__ import annotations

import asyncio
import grp
import logging
import os
import signal
import ssl
import stat
from pathlib import Path

import uvloop
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from llmos import protocol
from llmos.drivers.io.access_log import AccessLogger
from llmos.drivers.io.kernel_link import KernelLink
from llmos.drivers.io.limits import GuardedTCPSite, GuardedUnixSite, Limits
from llmos.drivers.io.server import make_app
from llmos.drivers.runtime import DriverRuntime, base_argparser, setup_logging

log = logging.getLogger("llmos.drivers.io")


def parse_args(argv=None):
    parser = base_argparser("io")
    parser.add_argument("--socket", required=True, help="path of the API's Unix socket")
    parser.add_argument("--socket-mode", default="600", help="the socket's permissions, octal (660: its group too)")
    parser.add_argument("--socket-group", default=None, help="the socket's group (name or gid)")
    parser.add_argument("--listen", default=None, help="also serve TCP on HOST:PORT (every request needs a key)")
    parser.add_argument("--tls-cert", default=None, help="serve TLS on --listen with this certificate (PEM)")
    parser.add_argument("--tls-key", default=None, help="... and this private key (PEM)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds to wait for each kernel answer to a generation request")
    parser.add_argument("--shutdown-timeout", type=float, default=5.0,
                        help="seconds in-flight HTTP requests get to finish at exit")
    d = Limits()
    parser.add_argument("--max-connections", type=int, default=d.max_connections,
                        help="connections served at once; more are answered 503 and closed")
    parser.add_argument("--header-timeout", type=float, default=d.header_timeout,
                        help="seconds a client gets to send a request's headers (0: no limit)")
    parser.add_argument("--keepalive-timeout", type=float, default=d.keepalive_timeout,
                        help="seconds an idle keep-alive connection stays open (0: no keep-alive)")
    parser.add_argument("--send-timeout", type=float, default=d.send_timeout,
                        help="seconds a client may read none of its response before it is cut off (0: no limit)")
    parser.add_argument("--max-header-line", type=int, default=d.max_field_size,
                        help="bytes in the request line or in one header line")
    parser.add_argument("--max-headers", type=int, default=d.max_headers, help="header lines in one request")
    args = parser.parse_args(argv)
    try:
        args.limits = Limits(max_connections=args.max_connections, header_timeout=args.header_timeout,
                             keepalive_timeout=args.keepalive_timeout, send_timeout=args.send_timeout,
                             max_line_size=args.max_header_line, max_field_size=args.max_header_line,
                             max_headers=args.max_headers)
    except ValueError as exc:
        parser.error(str(exc))
    return args


async def _listen_tcp(runner, args, runtime) -> None:
    host, _, port = args.listen.rpartition(":")
    context = None
    if args.tls_cert or args.tls_key:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)   # TLS 1.2+, safe ciphers
        try:
            context.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError, TypeError) as exc:
            runtime.fatal(f"cannot load the TLS certificate {args.tls_cert!r} / key {args.tls_key!r}: {exc}")
    try:
        site = GuardedTCPSite(runner, host.strip("[]") or "127.0.0.1", int(port), args.limits, ssl_context=context)
        await site.start()
    except (OSError, ValueError) as exc:
        runtime.fatal(f"cannot listen on {args.listen}: {exc}")
    log.info("serving on %s", site.name)


async def serve(args) -> None:
    stop = asyncio.Event()
    runtime = DriverRuntime("io", args.name, args.endpoint, asyncio=True)
    link = KernelLink(runtime, on_shutdown=lambda reason: stop.set())
    link.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    # handler_cancellation: a client that disconnects cancels its handler, whose cleanup
    # sends Abort so the kernel frees the request's memory.
    runner = web.AppRunner(make_app(link, args.timeout), handler_cancellation=True,
                           shutdown_timeout=args.shutdown_timeout, access_log_class=AccessLogger,
                           access_log=logging.getLogger("llmos.access"),
                           **args.limits.handler_kwargs())
    await runner.setup()
    sock = Path(args.socket)
    old_umask = os.umask(0o177)  # never world-accessible, not even between bind and chmod
    try:
        _remove_stale(sock)
        await GuardedUnixSite(runner, str(sock), args.limits).start()
    except OSError as exc:
        runtime.fatal(f"cannot listen on {sock}: {exc}")
    finally:
        os.umask(old_umask)
    try:
        if args.socket_group:
            gid = int(args.socket_group) if args.socket_group.isdigit() else grp.getgrnam(args.socket_group).gr_gid
            os.chown(sock, -1, gid)
        os.chmod(sock, int(args.socket_mode, 8) & 0o660)   # never for others, never executable
    except (OSError, KeyError, ValueError) as exc:
        runtime.fatal(f"cannot set the socket's group {args.socket_group!r} / mode {args.socket_mode!r}: {exc}")
    if args.listen:
        await _listen_tcp(runner, args, runtime)
    log.info("serving on %s", sock)
    runtime.ready(protocol.IoInfo(socket=str(sock), pid=os.getpid()))
    try:
        await stop.wait()
    finally:
        log.info("shutting down (%d requests in flight)", len(link.in_flight))
        # The kernel drains before it stops us; whatever is left gets an explicit error.
        link.fail_all("shutting_down", "llmos is shutting down", abort=True)
        await runner.cleanup()
        await link.stop()
        runtime.close()
        try:
            sock.unlink()
        except FileNotFoundError:
            pass


def _quiet_bad_requests(record: logging.LogRecord) -> bool:
    """aiohttp answers malformed HTTP with 400 itself but logs a traceback for each; a
    client sending garbage must not flood the log, so keep one line."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, HttpProcessingError):
        record.msg, record.args, record.exc_info = "bad HTTP request: %s", (" ".join(str(exc.message).split())[:200],), None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
    return True


def _remove_stale(sock: Path) -> None:
    """A previous io driver killed with -9 leaves its socket file behind; bind would fail."""
    try:
        mode = sock.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(f"{sock} exists and is not a socket; refusing to remove it")
    sock.unlink()


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging(args.name)
    logging.getLogger("aiohttp.server").addFilter(_quiet_bad_requests)
    sock_dir = Path(args.socket).parent
    sock_dir.mkdir(parents=True, exist_ok=True)
    uvloop.run(serve(args))


if __name__ == "__main__":
    main()
