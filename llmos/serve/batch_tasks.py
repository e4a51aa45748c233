"""Cluster batches on Ray: find the live replica daemons, submit one part to each, gather the
parts. Each call runs as a zero-CPU Ray task pinned to the node whose daemon it talks to,
over that daemon's Unix socket, so it works wherever the replicas are."""
from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import httpx
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from llmos.client import Client, InvalidBatchFile, LlmosError
from llmos.serve.batches import BatchRefused, Part, decode_id, encode_id, merge_results, merge_status, split_lines
from llmos.serve.daemon import health_ok, slot_in_use


def _on(node: str, fn):
    return ray.remote(num_cpus=0, max_retries=0)(fn).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))


def _live_homes(root: str) -> list[str]:
    """Slot homes under root held by a live replica whose daemon answers /health ok."""
    out = []
    for home in sorted(Path(root).glob("slot-*")):
        if home.is_dir() and slot_in_use(home):
            try:
                with Client(home, timeout=5) as c:
                    if health_ok(c.health()):
                        out.append(str(home))
            except LlmosError:
                pass
    return out


def _upload(home: str, lines: list[str], model: str | None, key: str) -> dict:
    # a refusal comes back as data: llmos's exceptions are not made to cross a pickle
    try:
        with Client(home, timeout=120) as c:
            return {"file": c.upload_file(lines, model=model, idempotency_key=key)}
    except InvalidBatchFile as exc:
        return {"error": exc.message, "lines": exc.lines}


def _start(home: str, file: dict, key: str) -> str:
    body = {"input_file_id": file["id"], "endpoint": (file.get("llmos") or {}).get("endpoint"),
            "completion_window": "24h", "metadata": {"cluster_key": key}}
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(Path(home) / "run" / "llmos.sock")),
                      base_url="http://llmos", timeout=120) as c:
        r = c.post("/v1/batches", json=body, headers={"Idempotency-Key": key})
        r.raise_for_status()
        return r.json()["id"]


def _job(home: str, job: str) -> dict | None:
    try:
        with Client(home, timeout=10) as c:
            return c.job(job)
    except LlmosError:
        return None   # not answering now: its replica is being replaced


def _results(home: str, job: str, errors: bool) -> list[str]:
    with Client(home, timeout=120) as c:
        return list(c.results(job, errors=errors))


async def live_daemons(root: str) -> list[tuple[str, str]]:
    nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
    homes = await asyncio.gather(*[_on(n, _live_homes).remote(root) for n in nodes])
    return [(n, h) for n, hs in zip(nodes, homes) for h in hs]


async def submit(root: str, lines: list[str], model: str | None) -> dict:
    """Split `lines` over every live daemon and start one batch per part. All parts are
    validated (uploaded) before any starts, so a bad line refuses the whole batch."""
    daemons = await live_daemons(root)
    if not daemons:
        raise BatchRefused("no replica daemon is ready", [])
    chunks = split_lines(lines, len(daemons))
    token = uuid.uuid4().hex
    keys = [f"cluster-{token}-{i}" for i in range(len(chunks))]
    uploads = [_on(n, _upload).remote(h, part, model, k) for (n, h), (_, part), k in zip(daemons, chunks, keys)]
    files = []
    for ref, (first, part) in zip(uploads, chunks):
        answer = await ref
        if "error" in answer:
            bad = [first + n for n in answer["lines"]]
            raise BatchRefused(f"invalid lines {bad}: {answer['error']}", bad)
        files.append(answer["file"])
    jobs = await asyncio.gather(*[_on(n, _start).remote(h, f, k)
                                  for (n, h), f, k in zip(daemons, files, keys)])
    parts = [Part(n, h, j, first, len(part)) for (n, h), j, (first, part) in zip(daemons, jobs, chunks)]
    return await status(encode_id(parts))


async def status(batch_id: str) -> dict:
    parts = decode_id(batch_id)
    jobs = await asyncio.gather(*[_on(p.node, _job).remote(p.home, p.job) for p in parts])
    return merge_status(batch_id, parts, list(jobs))


async def results(batch_id: str, errors: bool = False) -> list[str]:
    parts = decode_id(batch_id)
    lines = await asyncio.gather(*[_on(p.node, _results).remote(p.home, p.job, errors) for p in parts])
    return merge_results(list(lines))
