"""A tamper-evident audit log: append-only JSON lines, each chained to the one before by
SHA-256 and optionally signed with an HMAC key kept apart from the log.

Neutral ground: no torch, no drivers; the kernel writes it, the CLI reads and verifies it.
docs/security.md ("Audit log") describes the format and what verify can and cannot prove.
"""
from __future__ import annotations

from pathlib import Path

from llmos.audit.chain import GENESIS, AuditError
from llmos.audit.events import KINDS, request_fields
from llmos.audit.keys import ENV_KEY_FILE, generate_key, key_file_setting, load_key
from llmos.audit.log import AuditLog
from llmos.audit.read import read_records, tail
from llmos.audit.verify import Problem, VerifyResult, verify

__all__ = ["GENESIS", "KINDS", "ENV_KEY_FILE", "AuditError", "AuditLog", "Problem", "VerifyResult",
           "audit_dir", "generate_key", "key_file_setting", "load_key", "read_records",
           "request_fields", "tail", "verify"]


def audit_dir(home) -> Path:
    """Where the log lives: $LLMOS_HOME/audit (Paths.home / "audit")."""
    return Path(home) / "audit"
