"""What a Ray Serve deployment of llmos is made of: plain data, importable without Ray."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class ServeConfig:
    """One llmos application on Ray Serve.

    `models` and `daemon_args` are what each replica's llmosd is started with (`--model SPEC`
    each, then the extra arguments). `home_root` holds one home per replica slot
    (slot-0, slot-1, ...), the same absolute path on every node; None means `llmos-serve`
    under the working directory of the process that builds the app."""
    models: list[str] = field(default_factory=lambda: ["smollm2"])
    daemon_args: list[str] = field(default_factory=list)
    home_root: str | None = None
    # autoscaling on requests in flight per replica (Ray Serve's target_ongoing_requests)
    min_replicas: int = 1
    max_replicas: int = 1
    initial_replicas: int | None = None
    target_ongoing_requests: float = 8.0
    max_ongoing_requests: int = 64
    replica_num_cpus: float = 1.0
    # "prefix": Ray's PrefixCacheAffinityRouter; "pow2": Ray's default power of two choices
    router: str = "prefix"
    health_check_period_s: float = 2.0
    health_check_timeout_s: float = 30.0
    health_grace_s: float = 30.0      # a daemon /health not ok this long (its process alive) fails the replica
    ready_timeout_s: float = 600.0    # a replica's daemon must answer /health ok within this
    retry_deadline_s: float = 120.0   # how long the ingress re-routes a request whose daemon failed
    api_key: str | None = None        # when set, the ingress wants `Authorization: Bearer <api_key>`

    def resolved(self) -> "ServeConfig":
        root = Path(self.home_root) if self.home_root else Path.cwd() / "llmos-serve"
        return ServeConfig(**{**asdict(self), "home_root": str(root.expanduser().resolve())})

    def as_dict(self) -> dict:
        return asdict(self)
