"""Structured logs without a daemon: the JSON formatter, size rotation as a process sets it up
(a subprocess, so this session's logging is left alone), an uncaught exception, and reading
the files back the way `llmos logs` does (last lines across rotation, following through one)."""
from __future__ import annotations

import json
import logging
import logging.handlers
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from click.testing import CliRunner

from llmos.cli import logs as logs_cli
from llmos.cli.main import cli
from llmos.logging_setup import JsonFormatter

REPO = Path(__file__).resolve().parent.parent


def _run(code: str, env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO), **env},
                          capture_output=True, text=True, timeout=120, **kw)


def test_a_record_is_one_json_line_with_its_extras_and_traceback():
    fmt = JsonFormatter("io")
    record = logging.LogRecord("llmos.access", logging.INFO, __file__, 1, "GET %s %d", ("/health", 200), None)
    record.request_id, record.tenant, record.odd = "r-1", "alice", object()
    line = json.loads(fmt.format(record))
    assert line["msg"] == "GET /health 200" and line["level"] == "INFO" and line["process"] == "io"
    assert line["logger"] == "llmos.access" and line["pid"] == os.getpid() and line["time"].endswith("Z")
    assert line["request_id"] == "r-1" and line["tenant"] == "alice" and line["odd"].startswith("<object")
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    text = fmt.format(record)
    assert "\n" not in text
    assert "ValueError: boom" in json.loads(text)["exc"]


def test_rotation_by_size_keeps_a_bounded_contiguous_tail(tmp_path):
    code = ("import logging; from pathlib import Path; from llmos.logging_setup import setup_logging\n"
            f"setup_logging('kernel', Path({str(tmp_path)!r}))\n"
            "for i in range(3000): logging.getLogger('t').info('line %d', i, extra={'seq': i})\n")
    r = _run(code, {"LLMOS_LOG_MAX_BYTES": "4096", "LLMOS_LOG_BACKUPS": "3", "LLMOS_LOG_ECHO": "off"})
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""   # echo off: nothing on stderr
    files = logs_cli.chain(tmp_path, "kernel")
    assert [f.name for f in files] == ["kernel.log.3", "kernel.log.2", "kernel.log.1", "kernel.log"]
    assert all(f.stat().st_size <= 4096 for f in files)
    seqs = [json.loads(line)["seq"] for line in logs_cli.last_lines(files, -1)]   # every line is JSON
    assert seqs == list(range(seqs[0], 3000)) and seqs[0] > 0   # nothing lost in what is kept


def test_the_kernel_echoes_readable_lines_and_hands_its_choices_to_its_drivers(tmp_path):
    code = ("import logging, os; from pathlib import Path; from llmos.logging_setup import setup_logging\n"
            f"setup_logging('kernel', Path({str(tmp_path)!r}), 'debug')\n"
            "logging.getLogger('llmos.kernel.core').info('driver io: running -> stopping')\n"
            "print(os.environ['LLMOS_LOG_TARGET'], os.environ['LLMOS_LOG_LEVEL'])\n")
    r = _run(code, {"LLMOS_LOG_ECHO": ""})
    assert r.stdout.split() == ["file", "DEBUG"]
    assert " kernel INFO llmos.kernel.core: driver io: running -> stopping" in r.stderr
    assert json.loads((tmp_path / "kernel.log").read_text())["msg"] == "driver io: running -> stopping"


def test_journal_target_puts_json_on_stderr_and_no_file(tmp_path):
    code = ("import logging; from pathlib import Path; from llmos.logging_setup import setup_logging\n"
            f"setup_logging('kernel', Path({str(tmp_path)!r}))\n"
            "logging.getLogger('x').warning('to the journal', extra={'model': 'm'})\n")
    r = _run(code, {"LLMOS_LOG_TARGET": "journal"})
    line = json.loads(r.stderr.strip())
    assert line["msg"] == "to the journal" and line["model"] == "m"
    assert not list(tmp_path.iterdir())


def test_an_uncaught_exception_is_logged_and_still_on_stderr(tmp_path):
    code = ("from pathlib import Path; from llmos.logging_setup import setup_logging\n"
            f"setup_logging('model-x', Path({str(tmp_path)!r}))\n"
            "raise RuntimeError('the weights are gone')\n")
    r = _run(code, {"LLMOS_LOG_ECHO": "off"})
    assert r.returncode == 1 and "RuntimeError: the weights are gone" in r.stderr   # the default hook's
    line = json.loads((tmp_path / "model-x.log").read_text().splitlines()[-1])
    assert line["level"] == "CRITICAL" and "RuntimeError: the weights are gone" in line["exc"]


def _fill(folder: Path, name: str, count: int, max_bytes: int = 2048, backups: int = 3) -> None:
    log = logging.Logger(f"fill-{name}")
    handler = logging.handlers.RotatingFileHandler(folder / f"{name}.log", maxBytes=max_bytes, backupCount=backups)
    handler.setFormatter(JsonFormatter(name))
    log.addHandler(handler)
    for i in range(count):
        log.info("line %d", i, extra={"seq": i, "request_id": f"r-{i}"})
    handler.close()


def test_llmos_logs_prints_the_last_lines_across_rotation(tmp_path):
    logs_dir = tmp_path / "logs"
    logs_dir.mkdir()
    _fill(logs_dir, "io", 60)
    _fill(logs_dir, "kernel", 5)
    (logs_dir / "io.stderr.log").write_text("Traceback (most recent call last):\nOSError: raw\n")
    run = CliRunner().invoke
    r = run(cli, ["--home", str(tmp_path), "logs", "io", "-n", "25"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert len(lines) == 25 and lines[-1].split(" io ", 1)[1] == "fill-io: line 59  [seq=59 request_id=r-59]"
    assert "INFO" in lines[0] and "line 35" in lines[0]   # across the rotated files, in order
    raw = run(cli, ["--home", str(tmp_path), "logs", "io", "-n", "3", "--json"]).output.splitlines()
    assert [json.loads(x)["seq"] for x in raw] == [57, 58, 59]
    assert run(cli, ["--home", str(tmp_path), "logs"]).output.count("fill-kernel: line") == 5   # kernel by default
    assert "OSError: raw" in run(cli, ["--home", str(tmp_path), "logs", "io", "--stderr"]).output
    missing = run(cli, ["--home", str(tmp_path), "logs", "model-nope"])
    assert missing.exit_code == 1 and "logs there: kernel, io" in missing.output


def test_following_goes_on_across_rotation(tmp_path):
    """The writer waits for the reader after every 20 lines (about half a file), so at most one
    rotation happens between two reads: what -f can promise, without any sleep in the test."""
    seen: list[int] = []
    done = threading.Event()

    def show(line: str) -> None:
        seen.append(json.loads(line)["seq"])
        if seen[-1] == 499:
            done.set()
    reader = threading.Thread(target=logs_cli.follow, args=(tmp_path / "io.log", show),
                              kwargs={"poll_s": 0.01, "stop": done.is_set, "at_end": False})
    reader.start()
    log = logging.Logger("follow")
    handler = logging.handlers.RotatingFileHandler(tmp_path / "io.log", maxBytes=4096, backupCount=2)
    handler.setFormatter(JsonFormatter("io"))
    log.addHandler(handler)
    for i in range(500):
        log.info("n %d", i, extra={"seq": i})
        deadline = time.monotonic() + 30
        while i % 20 == 19 and (not seen or seen[-1] < i) and time.monotonic() < deadline:
            time.sleep(0.005)
    handler.close()
    assert done.wait(60), f"follow stopped at {seen[-3:]}"
    reader.join(10)
    assert len(list(tmp_path.glob("io.log.*"))) == 2   # it did rotate (and old files went)
    assert seen == list(range(500))


def test_a_librarys_private_record_attributes_are_not_fields():
    """Ray, once imported, stamps every LogRecord with _ray_timestamp_ns; a field per such
    attribute would change every line of every process that shares the interpreter."""
    from llmos.logging_setup import JsonFormatter
    rec = logging.LogRecord("llmos.x", logging.INFO, __file__, 1, "hello", (), None)
    rec._ray_timestamp_ns, rec.request_id = 123, "r-1"
    line = json.loads(JsonFormatter("kernel").format(rec))
    assert line["request_id"] == "r-1" and not any(k.startswith("_") for k in line)
