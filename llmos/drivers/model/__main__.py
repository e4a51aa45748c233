"""Model driver: loads one model and executes the kernel's step plans.

It owns the weights and nothing else: the KV pool belongs to the kernel (mapped on
MapKVPool) and every plan carries all the per-request state a step needs, so a
restarted driver continues exactly where a dead one stopped.
"""
from __future__ import annotations

import logging
import traceback
from pathlib import Path

from llmos import protocol
from llmos.drivers.model.threads import configure_cpu_env
from llmos.drivers.runtime import DriverRuntime, HeapTrimmer, base_argparser, setup_logging

log = logging.getLogger("llmos.model")
IDLE_MS = 1000   # no plan for this long: the driver is idle


def main() -> None:
    parser = base_argparser("model")
    parser.add_argument("--model", required=True, help="model spec (see llmos.models.registry)")
    parser.add_argument("--models-dir", required=True, help="where converted models are cached")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int4", "int8"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    setup_logging(args.name)
    applied = configure_cpu_env()   # before torch loads OpenMP and oneDNN (ModelRunner imports it)
    if applied:
        log.info("CPU runtime defaults: %s", applied)
    runtime = DriverRuntime("model", args.name, args.endpoint)
    try:
        from llmos.drivers.model.runner import ModelRunner
        from llmos.models.registry import prepare_model_dir
        model_dir = prepare_model_dir(args.model, Path(args.models_dir))
        runner = ModelRunner(model_dir, dtype=args.dtype, device=args.device)
    except Exception as exc:
        log.error("cannot load model %s:\n%s", args.model, traceback.format_exc())
        runtime.fatal(f"cannot load model {args.model!r}: {type(exc).__name__}: {exc}")
    runtime.ready({**runner.info(), "model_dir": str(model_dir)})
    heap = HeapTrimmer()
    while True:
        if not runtime.bus.poll(IDLE_MS):
            heap.trim()   # idle: a good moment to hand freed memory back
            continue
        msg = runtime.bus.recv()
        if isinstance(msg, protocol.StepPlan):
            heap.tick()
            try:
                reply = runner.execute(msg)
            except Exception as exc:
                log.error("step %d failed:\n%s", msg.step_id, traceback.format_exc())
                reply = protocol.StepFailed(step_id=msg.step_id, error=f"{type(exc).__name__}: {exc}")
            runtime.bus.send(reply)
        elif isinstance(msg, protocol.MapKVPool):
            try:
                runner.map_pool(msg)
                error = None
            except Exception as exc:
                log.error("cannot map KV pool:\n%s", traceback.format_exc())
                error = f"{type(exc).__name__}: {exc}"
            runtime.bus.send(protocol.PoolMapped(name=args.name, error=error))
        elif isinstance(msg, protocol.Shutdown):
            break
        elif msg is not None:
            log.warning("unexpected %s", type(msg).__name__)


if __name__ == "__main__":
    main()
