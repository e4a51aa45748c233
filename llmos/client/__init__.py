"""Python client for a running llmos daemon, over its Unix socket ($LLMOS_HOME/run/llmos.sock).

    from llmos.client import Client
    c = Client()
    print(c.chat("smollm2", [{"role": "user", "content": "hi"}])["choices"][0]["message"]["content"])
    for delta in c.stream_chat("smollm2", [{"role": "user", "content": "hi"}]):
        print(delta, end="", flush=True)

    job = c.submit_batch("prompts.jsonl", model="smollm2")   # durable batch job (OpenAI batch format)
    c.wait(job["id"]); out = list(c.results(job["id"]))     # see llmos.client.jobs

AsyncClient has the same methods, awaited (streams are async iterators). Both are built on
one description of the API (llmos.client.api, .calls, .jobs); they only execute it
differently (.sync_client, .async_client).

Errors (llmos.client.errors): `DaemonNotRunning` (no socket / nobody listening),
`RequestRejected` (4xx; `NotFound` for 404, `InvalidBatchFile` with the bad line numbers),
`ServerError` (5xx, or an error event in the middle of a stream); all are `LlmosError`.
`params` are the OpenAI / llmos request fields (max_tokens, temperature, seed, stop, ...).
"""
from llmos.client.api import DEFAULT_TIMEOUT
from llmos.client.async_client import AsyncClient, async_openai_client
from llmos.client.errors import (DaemonNotRunning, InvalidBatchFile, LlmosError, NotFound, RequestRejected,
                                 ServerError)
from llmos.client.jobs import FINAL, batch_file
from llmos.client.sync_client import Client, openai_client

__all__ = ["DEFAULT_TIMEOUT", "FINAL", "AsyncClient", "Client", "DaemonNotRunning", "InvalidBatchFile",
           "LlmosError", "NotFound", "RequestRejected", "ServerError", "async_openai_client", "batch_file",
           "openai_client"]
