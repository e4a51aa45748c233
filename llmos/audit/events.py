"""What the audit log records: the kinds, their fields, and the per-request record.

The kernel is the only caller (it sees every decision); drivers report to it. Fields are
JSON values; a secret (an API key, a token) never goes into a field: name a key by its id.

| kind | fields |
| --- | --- |
| auth.failure | principal (the key id or prefix claimed, if any), reason, route, peer |
| admin | principal, action (the command: restart, cancel, scale, ...), target, status |
| key.change | principal, action (create, revoke, rotate), key_id, status |
| model.load, model.unload | principal, model, version, status, reason |
| model.upgrade, model.rollback | principal, model, from_version, to_version, status, reason |
| job.submit | principal, job_id, model, lines, status |
| job.delete, job.cancel | principal, job_id, status |
| request | request_id, principal, tenant, model, endpoint, prompt_tokens, completion_tokens, status, finish_reason, error, duration_s; prompt only when record_prompts is on |
| audit.file | file: the first record of every file, naming it |
| audit.recovered | file, offset, bytes, sha256, torn_file: an unfinished write moved aside on open |
| audit.pruned | files, kept_from, kept_seq, kept_prev: old files about to be deleted |

`principal` is who acted: an API key id, `local` for the socket's owner, `@jobs` for the
kernel's own job runner.
"""
from __future__ import annotations

import base64
import json

KINDS = (
    "auth.failure", "admin", "key.change", "model.load", "model.unload", "model.upgrade",
    "model.rollback", "job.submit", "job.delete", "job.cancel", "request",
    "audit.file", "audit.recovered", "audit.pruned",
)


def request_fields(*, request_id: str, principal: str | None, model: str | None,
                   prompt_tokens: int, completion_tokens: int, status: int, duration_s: float,
                   tenant: str | None = None, endpoint: str | None = None,
                   finish_reason: str | None = None, error: str | None = None,
                   prompt=None, record_prompts: bool = False, seal=None) -> dict:
    """The fields of one `request` record. The prompt (text or chat messages) is kept only
    when the operator turned record_prompts on: by default the log says who asked which
    model for how many tokens, never what they asked. With `seal` (the job store's
    Keyring.seal) a kept prompt is encrypted like the job store's: `prompt_sealed`, base64,
    authenticated as "audit.prompt:<request_id>". Unset optional fields are left out."""
    fields = {
        "request_id": request_id, "principal": principal, "model": model,
        "prompt_tokens": int(prompt_tokens), "completion_tokens": int(completion_tokens),
        "status": int(status), "duration_s": round(float(duration_s), 6),
        "tenant": tenant, "endpoint": endpoint, "finish_reason": finish_reason, "error": error,
    }
    if record_prompts and prompt is not None:
        if seal is None:
            fields["prompt"] = prompt
        else:
            blob = seal(sealed_prompt_name(request_id), json.dumps(prompt).encode())
            fields["prompt_sealed"] = base64.b64encode(blob).decode()
    return {k: v for k, v in fields.items() if v is not None}


def sealed_prompt_name(request_id: str) -> str:
    return f"audit.prompt:{request_id}"


def open_prompt(rec: dict, open_sealed):
    """The prompt of a request record whose prompt is sealed (`open_sealed`: Keyring.open)."""
    return json.loads(open_sealed(sealed_prompt_name(rec["request_id"]), base64.b64decode(rec["prompt_sealed"])))
