"""Refusals of the job subsystem that are not 400s. The text starts with a code that the io
driver (drivers/io/batches.py) turns into a status:

    file_not_found, batch_not_found                                  404
    file_in_use, batch_active, idempotency_conflict, rotation_running 409
    storage_unavailable                                              503

Any other refusal (a ValueError) is a 400 with its message.
"""
from __future__ import annotations


class Refused(ValueError):
    """A refusal with a code ("CODE: message"); a ValueError, so the kernel answers it cleanly."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
