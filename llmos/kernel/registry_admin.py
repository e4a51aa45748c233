"""The model registry's admin operations, run by the kernel for /llmos/v1/models (the io
driver's model_admin.py): list and show are queries, add, rm, cp and defaults commands.

Each handler takes the Command's args and returns JSON-shaped data. A refusal raises
Refused, whose text starts with a code the io driver turns into a status:
    "unknown_model: ..."               404
    "bad_request(FIELD): ..."          400, naming the field
    "model_exists: ...", "model_loaded: ...", "model_builtin: ...", "model_not_prepared: ..."   409
    "registry_unavailable: ..."        503 (SQLite locked past its timeout, a full disk)
The kernel prefixes it with "WHAT: " (Kernel._command).

Nothing here converts a GGUF: that imports torch and takes ~25 s, which the kernel's loop
cannot spend (every stream would stall). A .gguf path is refused with a pointer to
`llmos models add`, which converts on the caller's side with a progress bar; an HF
directory is used in place and costs a config.json read.
"""
from __future__ import annotations

import dataclasses
import math
import sqlite3
from pathlib import Path
from typing import Callable

from llmos.models.catalog import Catalog, Entry
from llmos.models.names import BadModel, ModelExists, UnknownModel, bad_name

MAX_PATH = 4096        # PATH_MAX on Linux
MAX_NOTE = 1000
MAX_REPLICAS = 64      # as --max-loaded-models
MAX_KEEP_ALIVE_S = 10 * 365 * 86400.0   # as keep_alive.MAX_KEEP_ALIVE_S
_UNSET = object()


class Refused(ValueError):
    """A refusal with a code (see the module doc); a ValueError, so the kernel answers it cleanly."""

    def __init__(self, code: str, message: str, field: str | None = None):
        super().__init__(f"{code}({field}): {message}" if field else f"{code}: {message}")


class RegistryAdmin:
    """`is_loaded(name)`: whether the daemon has the model in memory (or loading) now, so that
    rm refuses it; `state_of(name)`: its residency state for the listings; `changed()`: called
    after each write, so the kernel's view of the registry names is read afresh."""

    def __init__(self, catalog: Catalog, is_loaded: Callable[[str], bool],
                 state_of: Callable[[str], str] | None = None, changed: Callable[[], None] | None = None):
        self.catalog, self.is_loaded = catalog, is_loaded
        self.state_of = state_of or (lambda name: "loaded" if is_loaded(name) else "unloaded")
        self.changed = changed or (lambda: None)
        self.queries = {"models.list": self._guard(self.list), "models.show": self._guard(self.show)}
        self.commands = {"models.add": self._guard(self.add), "models.rm": self._guard(self.rm),
                         "models.cp": self._guard(self.cp), "models.defaults": self._guard(self.defaults)}

    # ------------------------------------------------------------ queries
    def list(self, args: dict) -> list[dict]:
        _only(args, ())
        return [self._view(e) for e in self.catalog.list()]

    def show(self, args: dict) -> dict:
        _only(args, ("name",))
        name = _known(args, "name")
        entry = self.catalog.get(name)
        view = self._view(entry)
        view["versions"] = [{"version": v.number, "active": v.number == entry.active, "kind": v.kind,
                             "source": v.source, "prepared": v.prepared, "added_at": v.added_at, "note": v.note}
                            for v in entry.versions]
        view["history"] = [{"at": ev.at, "event": ev.kind, "version": ev.version, "reason": ev.reason}
                           for ev in self.catalog.history(name)]
        return view

    # ------------------------------------------------------------ commands
    def add(self, args: dict) -> dict:
        _only(args, ("name", "path", "note"))
        name = _name(args, "name")
        path = _text(args, "path", MAX_PATH)
        note = _text(args, "note", MAX_NOTE, required=False) or ""
        if self.catalog.exists(name) or self.is_loaded(name):   # (the daemon may serve it from --model)
            raise Refused("model_exists", f"model {name!r} already exists")
        source = Path(path)
        if not source.is_absolute():   # relative to what? The daemon's cwd is not the client's
            raise Refused("bad_request", f"{path!r} is not an absolute path", "path")
        if source.is_file() and (source.suffix == ".gguf" or _starts_with(source, b"GGUF")):
            raise Refused("bad_request", f"{path} is a GGUF file: the daemon does not convert GGUFs (it takes "
                          f"~25 s and torch); run `llmos models add {name} {path}`, which converts it on your "
                          f"side, and the daemon then serves {name}", "path")
        if not source.is_dir():   # only a directory reaches the catalog, so it never converts here
            why = "does not exist" if not source.exists() else "is neither a .gguf file nor a directory"
            raise Refused("bad_request", f"{path} {why}", "path")
        try:
            entry = self.catalog.add(name, source, note=note)
        except BadModel as exc:   # not a model directory (no or broken config.json)
            raise Refused("bad_request", str(exc), "path") from None
        self.changed()
        return self.show({"name": entry.name})

    def rm(self, args: dict) -> dict:
        _only(args, ("name", "force"))
        name = _known(args, "name")
        force = args.get("force", False)
        if not isinstance(force, bool):
            raise Refused("bad_request", "force must be true or false", "force")
        entry = self.catalog.get(name)
        if entry.builtin:
            raise Refused("model_builtin", f"model {name!r} is built in and cannot be removed")
        if not force and self.is_loaded(name):
            raise Refused("model_loaded", f"model {name!r} is loaded in the daemon: unload it first "
                          f"(POST /llmos/v1/models/{name}/unload), or remove it with force")
        freed = self.catalog.remove(name)
        self.changed()
        # A forced rm leaves a loaded model serving until it unloads; it cannot load again.
        return {"removed": name, "freed": [str(p) for p in freed], "still_loaded": self.is_loaded(name)}

    def cp(self, args: dict) -> dict:
        _only(args, ("name", "to"))
        src, dst = _known(args, "name"), _name(args, "to")
        entry = self.catalog.get(src)
        if self.catalog.exists(dst):
            raise Refused("model_exists", f"model {dst!r} already exists")
        if not (Path(entry.current.prepared) / "config.json").is_file():   # the catalog would convert it now
            raise Refused("model_not_prepared", f"model {src!r} is not converted yet; `llmos models cp {src} "
                          f"{dst}` converts it on your side, or load {src} once first")
        self.catalog.copy(src, dst)
        self.changed()
        return self.show({"name": dst})

    def defaults(self, args: dict) -> dict:
        """keep_alive_s (seconds >= 0, or None: the daemon's --keep-alive) and replicas. A model
        in memory keeps what it loaded with until its next load."""
        _only(args, ("name", "keep_alive_s", "replicas"))
        name = _known(args, "name")
        changes = {k: args[k] for k in ("keep_alive_s", "replicas") if k in args}
        if not changes:
            raise Refused("bad_request", "give keep_alive_s or replicas (or both)", "keep_alive_s")
        keep = changes.get("keep_alive_s", _UNSET)
        if keep is not _UNSET and keep is not None and not (
                isinstance(keep, (int, float)) and not isinstance(keep, bool)
                and math.isfinite(keep) and 0 <= keep <= MAX_KEEP_ALIVE_S):
            raise Refused("bad_request", f"keep_alive_s must be seconds from 0 to {MAX_KEEP_ALIVE_S:.0f}, "
                          "or null for the daemon's default", "keep_alive_s")
        replicas = changes.get("replicas", _UNSET)
        if replicas is not _UNSET and (type(replicas) is not int or not 1 <= replicas <= MAX_REPLICAS):
            raise Refused("bad_request", f"replicas must be a whole number from 1 to {MAX_REPLICAS}", "replicas")
        self.catalog.set_defaults(name, **changes)
        self.changed()
        return self.show({"name": name})

    # ------------------------------------------------------------ helpers
    def _view(self, e: Entry) -> dict:
        v = e.current
        try:
            facts = dataclasses.asdict(self.catalog.facts(e.name))
        except ValueError:   # the built-in before its first use, or a source that is gone
            facts = None
        return {"name": e.name, "builtin": e.builtin, "version": e.active, "kind": v.kind, "source": v.source,
                "prepared": v.prepared, "keep_alive_s": e.keep_alive_s, "replicas": e.replicas,
                "state": self.state_of(e.name), "facts": facts}

    @staticmethod
    def _guard(handler):
        """The registry's own errors as Refused, with their codes."""
        def run(args):
            if not isinstance(args, dict):
                raise Refused("bad_request", "the arguments must be an object")
            try:
                return handler(args)
            except Refused:
                raise
            except UnknownModel as exc:
                raise Refused("unknown_model", str(exc)) from None
            except ModelExists as exc:   # a concurrent add won the name
                raise Refused("model_exists", str(exc)) from None
            except BadModel as exc:
                raise Refused("bad_request", str(exc)) from None
            except sqlite3.Error as exc:
                raise Refused("registry_unavailable", f"the model registry: {exc}") from None
        run.__name__ = handler.__name__
        return run


def _only(args: dict, fields: tuple) -> None:
    extra = sorted(str(k) for k in args if k not in fields)
    if extra:
        raise Refused("bad_request", f"unknown field {extra[0][:64]!r}", extra[0][:64])


def _text(args: dict, field: str, limit: int, required: bool = True) -> str | None:
    value = args.get(field)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise Refused("bad_request", f"{field} is required (a non-empty string)", field)
    if len(value) > limit or "\0" in value:
        raise Refused("bad_request", f"{field} must be at most {limit} characters, without NUL", field)
    return value


def _name(args: dict, field: str) -> str:
    name = _text(args, field, 256)   # bad_name gives the precise reason
    why = bad_name(name)
    if why:
        raise Refused("bad_request", why, field)
    return name


def _known(args: dict, field: str) -> str:
    """The name of a model that should exist: one no model can have is simply unknown (404)."""
    name = args.get(field)
    if not isinstance(name, str):
        raise Refused("bad_request", f"{field} is required (a string)", field)
    if bad_name(name):
        raise Refused("unknown_model", f"model {name[:64]!r} is not registered")
    return name


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False
