"""The kernel's model commands: load, unload, scale, upgrade, rollback, and what /v1/models
lists. Each handler takes the command's args and returns its data, or raises ValueError
with the reason (the io driver answers it as an error naming it)."""
from __future__ import annotations

from llmos import protocol
from llmos.models.names import bad_name


def _name(args: dict) -> str:
    name = args.get("name")
    if not isinstance(name, str) or bad_name(name):
        raise ValueError("give a model name")
    return name


class ModelCommands:
    def __init__(self, host, upgrades, front):
        self.host, self.upgrades, self.front = host, upgrades, front
        self.commands = {"load": self.load, "unload": self.unload, "scale": self.scale,
                         "upgrade": self.upgrade, "rollback": self.rollback}
        self.queries = {"upgrade_status": lambda args: self.upgrades.status(_name(args))}

    def entry(self, name: str, created: int) -> protocol.ModelEntry:
        d = self.host.deployments.get(name)
        e = next((self.host.engines[x] for x in (d.serving if d else []) if x in self.host.engines), None)
        return protocol.ModelEntry(id=name, created=created, owned_by="llmos", state=self.host.state(name),
                                   max_model_len=e.max_model_len if e is not None and e.info else None,
                                   ready=e is not None and e.driver_ready,
                                   replicas=len(d.serving) if d else 0, version=d.version if d else None)

    def load(self, args: dict) -> dict:
        name = _name(args)
        refusal = self.host.ensure(name)
        if refusal is not None:
            raise ValueError(refusal[1])
        return {"model": name, "state": self.host.state(name)}

    def unload(self, args: dict) -> dict:
        name = _name(args)
        if name not in self.host.deployments:
            raise ValueError(f"model {name!r} is not loaded")
        held = sum(r.model == name for r in self.front.table.values()) + len(self.front.parking.by_model.get(name, {}))
        if held:
            raise ValueError(f"model {name!r} holds {held} request(s); unload it once they finish")
        self.host.unload_now(name, "asked to")
        return {"model": name, "state": self.host.state(name)}

    def scale(self, args: dict) -> dict:
        replicas = args.get("replicas")
        if type(replicas) is not int:
            raise ValueError("replicas must be a whole number")
        return self.host.scale(_name(args), replicas)

    def upgrade(self, args: dict) -> dict:
        version = args.get("version")
        if type(version) is not int or version < 1:
            raise ValueError("version must be a registry version number (llmos models show NAME)")
        in_place = args.get("in_place", False)
        if type(in_place) is not bool:
            raise ValueError("in_place must be true or false")
        return self.upgrades.start(_name(args), version, in_place)

    def rollback(self, args: dict) -> dict:
        return self.upgrades.rollback(_name(args))
