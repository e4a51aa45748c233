"""The supervisor with real child processes: a running driver that dies past its restart
budget is reported down exactly once, and a check that raises does not stop the others."""
from __future__ import annotations

import sys

from llmos import protocol
from llmos.kernel.supervisor import DriverSpec, Supervisor

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_a_driver_out_of_restarts_is_reported_down_once(tmp_path):
    downs = []
    sup = Supervisor(tmp_path, on_ready=lambda n, i: None, on_down=downs.append)
    sup.add(DriverSpec(name="d", role="io", argv=SLEEPER, max_restarts=0))
    sup.ready("d", protocol.IoInfo(socket="s", pid=1))
    d = sup.table["d"]
    d.proc.kill()
    d.proc.wait()
    sup._check(d, now=d.started_at + 1)
    assert sup.state_of("d")[0] == "failed" and downs == ["d"]


def test_a_ready_with_another_roles_info_is_refused(tmp_path):
    readies = []
    sup = Supervisor(tmp_path, on_ready=lambda n, i: readies.append((n, i)), on_down=lambda n: None)
    sup.add(DriverSpec(name="m", role="model", argv=SLEEPER))
    try:
        sup.ready("m", protocol.TokenizerInfo(vocab_size=9, eos_token_id=None))
        assert sup.state_of("m") == ("starting", "Ready with TokenizerInfo, not the model driver's info")
        assert readies == []
    finally:
        sup.table["m"].proc.kill()
        sup.table["m"].proc.wait()


def test_one_drivers_failing_check_does_not_stop_the_watch(tmp_path):
    import asyncio
    sup = Supervisor(tmp_path, on_ready=lambda n, i: None, on_down=lambda n: None)
    for name in ("a", "b"):
        sup.add(DriverSpec(name=name, role="model", argv=[sys.executable, "-c", "import time; time.sleep(60)"]))
    checked = []
    real = sup._check

    def check(d, now):
        checked.append(d.spec.name)
        if d.spec.name == "a":
            raise OSError("cannot spawn: too many open files")
        real(d, now)
    sup._check = check

    async def watch_a_little():
        task = asyncio.ensure_future(sup.watch(interval=0.01))
        while checked.count("b") < 3:
            await asyncio.sleep(0.01)
        assert not task.done()
        sup.stopping = True
        await task
    try:
        asyncio.run(watch_a_little())
    finally:
        for d in sup.table.values():
            d.proc.kill()
            d.proc.wait()
