"""app.live.worker: one thread, a bounded queue, refusal when full, time limits, shutdown."""

from __future__ import annotations

import threading
import time

import pytest

from app.live.admission import LivePlaces
from app.live.worker import LiveRefused, LiveWorker, WorkerBusy, WorkerStopped, WorkerTimeout


@pytest.fixture
def worker():
    w = LiveWorker(queue_size=1).start()
    yield w
    w.stop()


def blocked(worker: LiveWorker) -> threading.Event:
    """Occupy the worker thread until the returned event is set."""
    started, release = threading.Event(), threading.Event()

    def hold():
        started.set()
        release.wait(10)

    worker.submit(hold)
    assert started.wait(10)
    return release


def test_runs_jobs_on_one_thread_and_returns_results(worker):
    threads = {worker.run(lambda: threading.current_thread().name, timeout_s=10) for _ in range(3)}
    assert threads == {"saescope-live"}
    assert worker.run(pow, 2, 10, timeout_s=10) == 1024


def test_a_job_error_reaches_the_caller_and_the_worker_lives_on(worker):
    with pytest.raises(ZeroDivisionError):
        worker.run(lambda: 1 / 0, timeout_s=10)
    assert worker.run(lambda: "alive", timeout_s=10) == "alive"


def test_a_full_queue_refuses_at_once_with_a_retry_estimate(worker):
    release = blocked(worker)
    queued = worker.submit(lambda: "queued")
    with pytest.raises(WorkerBusy) as refused:
        worker.submit(lambda: "refused")
    assert refused.value.retry_after_s >= 1
    release.set()
    assert queued.result(10) == "queued"


def test_a_place_is_taken_before_any_work_and_given_back_when_the_request_fails(worker):
    release = blocked(worker)
    with pytest.raises(ValueError), worker.admit():
        assert worker.queued == 1  # held while the request is prepared (tokenised ...)
        raise ValueError("the prompt is too long")
    assert worker.queued == 0
    place = worker.admit()
    with pytest.raises(WorkerBusy):
        worker.admit()  # the one place is held, though no job is queued yet
    place.release()
    place.release()  # giving it back twice frees one place only
    assert worker.queued == 0
    assert place is not worker.admit()
    release.set()


def test_a_timed_out_queued_job_is_cancelled_and_never_runs(worker):
    release = blocked(worker)
    ran = threading.Event()
    with pytest.raises(WorkerTimeout, match="within 0.05 s"):
        worker.run(ran.set, timeout_s=0.05)
    release.set()
    while worker.queued:  # the cancelled job holds its slot until the thread pops and skips it
        time.sleep(0.01)
    assert worker.run(lambda: "next", timeout_s=10) == "next"
    assert not ran.is_set()


def test_stop_cancels_queued_jobs_and_refuses_new_ones():
    worker = LiveWorker(queue_size=2).start()
    release = blocked(worker)
    queued = worker.submit(lambda: "never")
    threading.Timer(0.05, release.set).start()
    worker.stop()
    assert queued.cancelled()
    with pytest.raises(WorkerStopped):
        worker.submit(lambda: None)


def test_live_places_are_shared_through_their_folder_and_refuse_at_once_when_all_held(tmp_path):
    """Two LivePlaces on one folder count together, as the web workers of one server do: each
    opens its own lock files, like another process."""
    one, other = LivePlaces(tmp_path, 2), LivePlaces(tmp_path, 2)
    with one.hold(), other.hold():
        for places in (one, other):
            with pytest.raises(LiveRefused) as refused, places.hold():
                pass
            assert refused.value.status == 503
            assert refused.value.retry_after_s >= 1
    with one.hold(), one.hold():  # given back when their blocks end
        pass


def test_with_a_deadline_a_request_that_would_likely_end_past_it_is_refused_at_once():
    worker = LiveWorker(queue_size=8, deadline_s=2.5).start()
    try:
        worker.run(time.sleep, 0.3, timeout_s=10)  # the mean duration falls from 1 s toward 0.3
        assert worker._mean_duration_s == pytest.approx(0.86, abs=0.05)
        release = blocked(worker)
        queued = worker.submit(lambda: "queued")  # the running job and this: 2 x 0.86 <= 2.5 s
        with pytest.raises(WorkerBusy) as refused:  # ... and one more: 3 x 0.86 > 2.5 s
            worker.submit(lambda: "too late")
        assert refused.value.retry_after_s >= 1 and worker.queued == 1
        release.set()
        assert queued.result(10) == "queued"
        worker._mean_duration_s = 60.0  # as after one very slow job
        assert worker.run(lambda: "idle", timeout_s=10) == "idle"  # it starts at once: admitted
        assert worker._mean_duration_s < 50  # ... and its duration brings the mean back down
    finally:
        worker.stop()
    without = LiveWorker(queue_size=8).start()
    try:
        release = blocked(without)
        for _ in range(3):
            without.submit(lambda: "queued")  # no deadline: only the queue's size bounds it
        assert without.queued == 3
        release.set()
    finally:
        without.stop()
