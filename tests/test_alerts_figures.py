"""The figures alert rules read (kernel/alert_figures.py): the kernel's MetricsSnapshot as it
is, the model host's failed models, and how long each in-progress batch job has gone without
a line finishing (polled from the job store, with an injected clock)."""
from __future__ import annotations

from types import SimpleNamespace

from llmos import protocol
from llmos.kernel.alert_figures import JOB_POLL_S, KernelFigures
from llmos.kernel.residency import Residency, Resident


class Clock:
    t = 100.0

    def __call__(self):
        return self.t


class Store:
    def __init__(self):
        self.jobs = {}
        self.reads = 0

    def get_job(self, job_id):
        self.reads += 1
        return self.jobs.get(job_id)


def snapshot():
    return protocol.MetricsSnapshot(taken_at=0.0, families=[
        protocol.MetricFamily(name="llmos_driver_restarts_total", kind="counter", help="", label_names=["driver", "role"],
                              bounds=None, series=[protocol.MetricSeries(labels=["io", "io"], value=2.0, buckets=None)]),
        protocol.MetricFamily(name="llmos_request_queue_time_seconds", kind="histogram", help="",
                              label_names=["model", "priority_class"], bounds=[1.0, 2.0],
                              series=[protocol.MetricSeries(labels=["m", "batch"], value=4.5, buckets=[1, 2, 3])])])


def test_the_snapshot_failed_models_and_stalled_jobs():
    clock, store = Clock(), Store()
    host = SimpleNamespace(table=SimpleNamespace(models={"a": Resident("a", Residency.FAILED),
                                                         "b": Resident("b", Residency.LOADED)}))
    jobs = SimpleNamespace(active=["j1", "j2", "gone"], store=store)
    store.jobs = {"j1": {"status": "in_progress", "completed": 1, "failed": 0},
                  "j2": {"status": "cancelling", "completed": 0, "failed": 0}}
    figures = KernelFigures(SimpleNamespace(snapshot=snapshot), host, lambda: jobs, clock)
    f = figures.read()
    assert f["llmos_driver_restarts_total"].series == {("io", "io"): 2.0}
    q = f["llmos_request_queue_time_seconds"]
    assert (q.kind, q.bounds, q.series) == ("histogram", [1.0, 2.0], {("m", "batch"): [1, 2, 3]})
    assert f["llmos_model_failed"].series == {("a",): 1.0, ("b",): 0.0}
    assert f["llmos_batch_job_stalled_seconds"].series == {("j1",): 0.0}
    reads = store.reads
    clock.t += JOB_POLL_S / 2   # between polls: the time grows, the store is not read
    assert figures.read()["llmos_batch_job_stalled_seconds"].series == {("j1",): JOB_POLL_S / 2}
    assert store.reads == reads
    clock.t += JOB_POLL_S      # a poll, no progress: still counting from the first sight
    assert figures.read()["llmos_batch_job_stalled_seconds"].series == {("j1",): 1.5 * JOB_POLL_S}
    store.jobs["j1"]["completed"] = 2
    clock.t += JOB_POLL_S      # a line finished: from now
    assert figures.read()["llmos_batch_job_stalled_seconds"].series == {("j1",): 0.0}
    jobs.active = []
    clock.t += JOB_POLL_S
    assert figures.read()["llmos_batch_job_stalled_seconds"].series == {}


def test_before_the_job_manager_exists_there_are_no_jobs():
    host = SimpleNamespace(table=SimpleNamespace(models={}))
    f = KernelFigures(SimpleNamespace(snapshot=snapshot), host, lambda: None, Clock()).read()
    assert f["llmos_batch_job_stalled_seconds"].series == {} and f["llmos_model_failed"].series == {}
