"""The daemon's configuration: one dataclass, filled from llmosd's command line."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DaemonConfig:
    models: list[str] = field(default_factory=lambda: ["smollm2"])   # model specs (registry syntax)
    dtype: str = "float32"
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    kv_memory: str = "1GiB"           # bytes, '4GiB', or a fraction of free device memory
    block_size: int = 16
    max_num_seqs: int = 128
    max_batched_tokens: int = 1024    # per-step token budget (prefill chunks + decodes)
    max_model_len: int | None = None  # cap the model's context (default: the model's own)
    drain_timeout: float = 30.0       # SIGTERM: how long in-flight requests may finish
    first_answer_timeout: float = 600.0
    prefix_caching: bool = True
    swap_memory: str = "512MiB"       # host swap pool: bytes, '2GiB', or a fraction of free host memory
    preemption_mode: str = "auto"     # auto (cost estimate) | swap | recompute
    max_restarts: int = 5
    scheduler: str = "priority"       # priority (classes, tenants, aging) | fcfs
    tenants: dict = field(default_factory=dict)   # tenant name -> llmos.kernel.tenants.TenantConfig
    request_timeout_s: float | None = None        # server default total deadline
    queue_timeout_s: float | None = None          # server default deadline for first admission
    keep_alive_s: float = 300.0       # an on-demand model unloads this long after its last request (Ollama's 5m)
    max_loaded_models: int = 1        # engines in memory at once; each gets kv_memory / max_loaded_models of KV
    replicas: int = 1                 # model drivers per --model model (each one engine)
    replica_devices: list = field(default_factory=list)   # devices engines spread over; ["all"]: every GPU
    allow_local_users: bool = False   # other local uids may use the socket without a key (default tenant)
    socket_mode: str = "600"          # octal; "660" lets the socket's group connect (they still need keys)
    socket_group: str | None = None
    listen: str | None = None         # HOST:PORT of the optional TCP listener (keys required)
    tls_cert: str | None = None       # PEM files: TLS on the TCP listener
    tls_key: str | None = None
    audit_key_file: str | None = None     # HMAC key for the audit chain (else $LLMOS_AUDIT_KEY_FILE; none: unsigned)
    audit_record_prompts: bool = False    # put prompt text in the audit log's request records
    job_retention_days: float | None = None   # ended jobs and files older than this are deleted (None: kept)
    memory_limit_bytes: int | None = None   # weights + KV of all models together (None: what the device has)
    kv_events_endpoint: str | None = None   # ZeroMQ PUB endpoint for the prefix cache's events, e.g. tcp://*:5557
    kv_events_pod: str | None = None        # the pod name in their topic kv@POD@MODEL (default: the host name)
    kv_events_hash_seed: str = ""           # llm-d's HashSeed (vLLM's PYTHONHASHSEED): seeds the block hashes
    alert_rules: list | None = None     # rule tables over the defaults (kernel/alert_rules.py); None: the defaults
    alert_command: str | None = None    # run for each alert that fires or resolves, the alert as JSON on stdin
    alert_webhook: str | None = None    # http(s) URL: POST the same JSON
    # What SIGHUP needs to re-read the config file (llmos/config_file.py, llmos/kernel/reload.py):
    config_file: str | None = None    # its path (it need not exist: then only flags and defaults apply)
    cli_overrides: dict = field(default_factory=dict)   # what the command line gave, as file keys
    effective: dict = field(default_factory=dict)       # file keys -> the values in force (config show's)

