"""`llmos submit` and `llmos jobs ...`: durable batch jobs in OpenAI's batch format.

All of it goes through the SDK (llmos.client) over the API socket; errors (daemon not
running, a refused file naming its bad lines) are printed by the `llmos` group.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from llmos.cli.format import dur, print_table
from llmos.client import FINAL, Client
from llmos.keep_alive import parse_keep_alive
from llmos.paths import Paths


def _progress(job: dict) -> str:
    c = job["request_counts"]
    return f"{c['completed'] + c['failed']}/{c['total']}"


@click.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", help="model for lines whose body names none")
@click.option("--wait", "wait_", is_flag=True, help="wait for the job to finish, with a progress bar")
@click.pass_obj
def submit(paths: Paths, file: Path, model, wait_):
    """Submit FILE (OpenAI batch JSONL) as a durable job and print its id.

    Every line is validated first; a bad file is refused with the numbers of its bad lines."""
    with Client(paths.home) as c:
        job = c.submit_batch(file, model=model)
        click.echo(job["id"])
        if wait_:
            _wait(c, job["id"], None)


@click.group(invoke_without_command=True)
@click.pass_context
def jobs(ctx):
    """Batch jobs: list them (no subcommand), show, wait, cancel, results, rm, purge."""
    if ctx.invoked_subcommand is not None:
        return
    with Client(ctx.obj.home, timeout=10) as c:
        data = c.jobs()
    if not data:
        click.echo("no jobs")
        return
    now = time.time()
    print_table(["JOB", "STATUS", "DONE", "FAILED", "ENDPOINT", "AGE"],
                [[j["id"], j["status"], _progress(j), j["request_counts"]["failed"], j["endpoint"],
                  dur(now - j["created_at"])] for j in data])


@jobs.command()
@click.argument("job_id")
@click.pass_obj
def show(paths: Paths, job_id):
    """Counts by state, tokens, throughput and ETA of a job."""
    with Client(paths.home, timeout=10) as c:
        j = c.job(job_id)
    x = j["llmos"]
    counts = ", ".join(f"{v} {k}" for k, v in x["counts"].items() if k != "total")
    rate = x["throughput"]
    eta = x["eta_s"]
    rows = [("job", j["id"]), ("status", j["status"]), ("endpoint", j["endpoint"]),
            ("input", j["input_file_id"]), ("created", time.strftime("%Y-%m-%d %H:%M:%S",
                                                                     time.localtime(j["created_at"]))),
            ("requests", f"{x['counts']['total']} total: {counts}"),
            ("tokens", f"{j['usage']['input_tokens']} prompt, {j['usage']['output_tokens']} completion"),
            ("throughput", f"{rate['requests_per_s']} requests/s, {rate['tokens_per_s']} tokens/s "
                           f"({'whole job' if j['status'] in FINAL else 'last 30 s'})"),
            ("eta", "-" if eta is None else dur(eta)),
            ("output", x["output_file_id"]), ("errors", x["error_file_id"])]
    if j.get("metadata"):
        rows.append(("metadata", j["metadata"]))
    for key, value in rows:
        click.echo(f"{key + ':':<12}{value}")


def _wait(c: Client, job_id: str, timeout: float | None) -> dict:
    first = c.job(job_id)
    total, shown = first["request_counts"]["total"], 0
    with click.progressbar(length=total, label=job_id, show_eta=True, show_pos=True,
                           file=sys.stderr) as bar:
        def step(job: dict) -> None:
            nonlocal shown
            counts = job["request_counts"]
            done = counts["completed"] + counts["failed"]
            bar.update(done - shown)
            shown = done
        job = c.wait(job_id, timeout=timeout, on_progress=step)
    counts = job["request_counts"]
    click.echo(f"{job_id} {job['status']}: {counts['completed']} completed, {counts['failed']} failed "
               f"of {counts['total']}")
    if job["status"] != "completed":
        raise click.exceptions.Exit(1)
    return job


@jobs.command()
@click.argument("job_id")
@click.option("--timeout", type=float, help="give up after this many seconds (exit code 2)")
@click.pass_obj
def wait(paths: Paths, job_id, timeout):
    """Wait for a job to finish, with a progress bar; exit code 1 unless it completed."""
    with Client(paths.home) as c:
        try:
            _wait(c, job_id, timeout)
        except TimeoutError as exc:
            click.echo(str(exc), err=True)
            raise click.exceptions.Exit(2) from None


@jobs.command()
@click.argument("job_id")
@click.pass_obj
def cancel(paths: Paths, job_id):
    """Cancel a job: nothing more is started, running requests are aborted."""
    with Client(paths.home, timeout=30) as c:
        job = c.cancel(job_id)
    click.echo(f"{job['id']} {job['status']} ({_progress(job)} finished)")


@jobs.command()
@click.argument("job_id")
@click.option("-o", "--output", default="-", type=click.Path(dir_okay=False, allow_dash=True),
              help="where to write the output lines (default stdout)")
@click.option("-e", "--errors", type=click.Path(dir_okay=False),
              help="where to write the error lines (default OUTPUT with .errors.jsonl; none for stdout)")
@click.pass_obj
def results(paths: Paths, job_id, output, errors):
    """Write a job's results in OpenAI's batch output format: one line per custom_id,
    failed (and, for a cancelled job, unfinished) requests in the error file."""
    if errors is None and output != "-":
        errors = str(Path(output).with_suffix("")) + ".errors.jsonl"
    with Client(paths.home) as c:
        job = c.job(job_id)
        n_out = _write(c.results(job_id), output, always=True)
        n_err = _write(c.results(job_id, errors=True), errors) if errors else 0
    where = "stdout" if output == "-" else output
    note = f", {n_err} errors to {errors}" if n_err else ""
    state = "" if job["status"] in ("completed", "failed", "cancelled") else f" (job is {job['status']}: so far)"
    click.echo(f"{n_out} results to {where}{note}{state}", err=True)


def _write(lines, path: str, always: bool = False) -> int:
    """Write lines to path ("-": stdout); unless `always`, a file only when there is a line."""
    n, out = 0, click.open_file(path, "w", encoding="utf-8") if always else None
    try:
        for line in lines:
            if out is None:
                out = click.open_file(path, "w", encoding="utf-8")
            out.write(line + "\n")
            n += 1
    finally:
        if out is not None:
            out.close()
    return n


@jobs.command("rm")
@click.argument("job_ids", nargs=-1, required=True)
@click.option("--keep-input", is_flag=True, help="keep the input file (by default it goes too, unless "
                                                 "another job reads it)")
@click.pass_obj
def rm(paths: Paths, job_ids, keep_input):
    """Delete ended jobs: their results, and their input files. A running job is refused
    (cancel it first). What they held is erased from the job store and its WAL."""
    with Client(paths.home, timeout=30) as c:
        for job_id in job_ids:
            gone = c.delete_job(job_id, input_file=not keep_input)
            click.echo(f"{job_id} deleted" + (" (and its input file)" if gone.get("input_file_deleted") else ""))


def _age(text: str) -> float:
    try:
        seconds = parse_keep_alive(text)
    except ValueError:
        seconds = None
    if seconds is None or seconds < 0:
        raise click.BadParameter(f"{text!r}: use a duration like 7d, 12h or 30m")
    return seconds


@jobs.command()
@click.option("--older-than", "older_than", required=True, help="jobs that ended at least this long ago: 7d, 12h, 0")
@click.option("--keep-input", is_flag=True, help="keep their input files")
@click.pass_obj
def purge(paths: Paths, older_than, keep_input):
    """Delete every job that ended at least --older-than ago (running jobs are kept)."""
    age = _age(older_than)
    with Client(paths.home, timeout=120) as c:
        out = c.purge_jobs(age, input_files=not keep_input)
    click.echo(f"{out['deleted']} job(s) deleted, {out['input_files_deleted']} input file(s)")
