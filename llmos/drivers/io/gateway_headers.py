"""The Gateway API Inference Extension's request headers, as llmos's priority class and tenant.

    x-gateway-inference-objective     critical | realtime -> realtime; standard | interactive ->
                                      interactive; sheddable | batch -> batch (case-insensitive)
    x-gateway-inference-fairness-id   the tenant: 1 to 64 characters, the body's tenant's rules

A header, set by the cluster's gateway, wins over the same field of the body, set by the
client. Neither widens what a key allows: the kernel refuses a tenant or a class that a key
does not grant (403), as it does for the body's fields, and the refusal then names the header.
"""
from __future__ import annotations

from llmos.openai_format import ApiError, ParsedRequest
from llmos.sampling_params import MAX_TENANT_CHARS, InvalidParam, check_text

OBJECTIVE = "x-gateway-inference-objective"
FAIRNESS_ID = "x-gateway-inference-fairness-id"
CLASSES = {"critical": "realtime", "realtime": "realtime", "standard": "interactive", "interactive": "interactive",
           "sheddable": "batch", "batch": "batch"}


def apply(headers, req: ParsedRequest) -> dict[str, str]:
    """Set req's priority and tenant from the headers; ApiError(400) naming a bad header.
    Returns {field: header} for each field a header set."""
    set_by = {}
    objective = headers.get(OBJECTIVE)
    if objective is not None:
        klass = CLASSES.get(objective.strip().lower())
        if klass is None:
            raise ApiError(400, f"{OBJECTIVE} must be one of {', '.join(CLASSES)}, got {objective[:64]!r}", OBJECTIVE)
        req.priority, set_by["priority"] = klass, OBJECTIVE
    tenant = headers.get(FAIRNESS_ID)
    if tenant is not None:
        tenant = tenant.strip()
        if not 0 < len(tenant) <= MAX_TENANT_CHARS:
            raise ApiError(400, f"{FAIRNESS_ID} must be 1 to {MAX_TENANT_CHARS} characters", FAIRNESS_ID)
        try:
            check_text(FAIRNESS_ID, tenant)
        except InvalidParam as exc:
            raise ApiError(400, str(exc), FAIRNESS_ID) from None
        req.tenant, set_by["tenant"] = tenant, FAIRNESS_ID
    return set_by


def name_header(err: ApiError, set_by: dict[str, str]) -> ApiError:
    """A refusal of a field that a header set names the header, so the client knows what to fix."""
    if err.param in set_by:
        err.param = set_by[err.param]
    return err
