"""Submits that wait for their model to load. They are not requests yet: admission needs
the model's limits (context, vocabulary, its scheduler's quotas), which come with its
driver's Ready. When the model is up they are submitted again, in arrival order; if
its load fails, each gets one clear error."""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

from llmos import names, protocol

MAX_PARKED = 4096   # across all models; past it a request for a cold model gets a 503


@dataclass
class Parked:
    peer: str
    submit: protocol.Submit
    since: float
    principal: object                 # kernel/auth.Principal: it is submitted again as this one


class Parking:
    def __init__(self):
        self.by_model: dict[str, OrderedDict[str, Parked]] = {}
        self._model_of: dict[str, str] = {}   # request id -> model

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._model_of

    def __len__(self) -> int:
        return len(self._model_of)

    def models(self) -> set[str]:
        return set(self.by_model)

    def park(self, peer: str, m: protocol.Submit, principal) -> bool:
        """False when full (the caller refuses the request)."""
        if len(self._model_of) >= MAX_PARKED:
            return False
        self.by_model.setdefault(m.model, OrderedDict())[m.request_id] = Parked(peer, m, time.monotonic(), principal)
        self._model_of[m.request_id] = m.model
        return True

    def take(self, model: str) -> list[Parked]:
        """Every submit waiting for `model`, oldest first; they leave the parking."""
        waiting = list(self.by_model.pop(model, {}).values())
        for p in waiting:
            self._model_of.pop(p.submit.request_id, None)
        return waiting

    def take_all(self) -> list[Parked]:
        return [p for model in list(self.by_model) for p in self.take(model)]

    def get(self, request_id: str) -> Parked | None:
        model = self._model_of.get(request_id)
        return None if model is None else self.by_model[model][request_id]

    def remove(self, request_id: str) -> Parked | None:
        model = self._model_of.pop(request_id, None)
        if model is None:
            return None
        queue = self.by_model[model]
        parked = queue.pop(request_id)
        if not queue:
            del self.by_model[model]
        return parked

    def summaries(self, mine=lambda owner: True) -> list[protocol.RequestSummary]:
        now = time.monotonic()
        return [protocol.RequestSummary(id=p.submit.client_request_id or p.submit.request_id,
                                        kernel_id=p.submit.request_id if p.submit.client_request_id else None,
                                        model=model, tenant=p.submit.tenant, state=names.LOADING,
                                        prompt_tokens=0, output_tokens=0, blocks=0, preemptions=0,
                                        priority="" if p.submit.priority is None else str(p.submit.priority), waited_s=round(now - p.since, 3),
                                        age_s=round(now - p.since, 3))
                for model, queue in self.by_model.items() for p in queue.values() if mine(p.principal.name)]
