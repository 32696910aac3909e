"""The pipes between pool and worker: typed events and commands, one encoder and decoder each."""

from __future__ import annotations

import logging
import os

import pytest

from skunkqueue import channel
from skunkqueue.channel import (
    ChannelError,
    Claimed,
    Done,
    Goodbye,
    HandBack,
    Hello,
    Interrupt,
    NeverStart,
    Reason,
    Starting,
    Stop,
    StopMode,
    decode_command,
    decode_event,
    encode,
)
from skunkqueue.record import LeaseStatus

# Ids come from the store: a route or an id may hold anything a line or a word could break on.
HOSTILE_IDS = ["0196a1b2c3d4e5f6a7b8c9d0e1", "a b", "line\nbreak", "{}:$.%20", "ünï", "d 1 2 3", "", "%", "\t\r"]


@pytest.mark.parametrize("job_id", HOSTILE_IDS)
def test_every_event_round_trips(job_id: str) -> None:
    for event in (Hello(job_id), Claimed(12.5, job_id, 7, 0.25), Claimed(1.0, job_id, 1, 0.0),
                  Starting(3.25, job_id), Done(job_id, "complete", 0.5), Done(job_id, "lost", 2.0),
                  HandBack(job_id), Goodbye(job_id)):
        line = encode(event)
        if job_id:
            assert "\n" not in line and decode_event(line) == event


@pytest.mark.parametrize("job_id", [i for i in HOSTILE_IDS if i])
def test_every_command_round_trips(job_id: str) -> None:
    commands = [*(Interrupt(job_id, reason) for reason in Reason), NeverStart(job_id),
                *(Stop(how) for how in StopMode)]
    for command in commands:
        line = encode(command)
        assert "\n" not in line and decode_command(line) == command


def test_the_words_are_the_documented_ones() -> None:
    assert encode(Interrupt("j", Reason.TIME)) == "i j time"
    assert encode(Stop(StopMode.ROUGH)) == "t rough"
    assert encode(Done("j", "error", 1.5)) == "d j error 1.500000"
    assert encode(Claimed(2.0, "j", 3, 0)) == "c 2.000000 j 3 0"
    assert [str(r) for r in Reason] == ["kill", "time", "lost"]
    assert f"{StopMode.GENTLE}" == "gentle" and str(LeaseStatus.KILL) == "kill"
    assert LeaseStatus("lost") is LeaseStatus.LOST and LeaseStatus.OK == "ok"  # backends may answer words


@pytest.mark.parametrize("line", ["", "z 1", "h", "h a b", "c x j 1 0", "c 1 j one 0", "s 1", "d j complete",
                                  "d j complete soon", "k", "b", "b w 1", "i j", "i j nap", "x", "t", "t sideways",
                                  "\x00\x01", "c 1 j 1 0 extra"])
def test_a_garbled_line_is_one_clear_error(line: str) -> None:
    for decode in (decode_event, decode_command):
        with pytest.raises(ChannelError, match=r"not an? (event|command) of the (worker|pool) channel"):
            decode(line)


def test_the_pool_reads_past_a_garbled_line_and_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    pool = channel.PoolEnd()
    events_fd, control_fd, pulse_fd = pool.child_fds()
    worker = channel.WorkerEnd(events_fd, control_fd, pulse_fd)
    try:
        worker.send(Hello("w1"))
        os.write(events_fd, b"c not-a-number j 1 0\n\xff\xfe garbage\n")
        worker.send(Starting(1.0, "j"), Done("j", "complete", 0.1))
        with caplog.at_level(logging.ERROR, logger="skunkqueue.channel"):
            events = pool.events()
        assert events == [Hello("w1"), Starting(1.0, "j"), Done("j", "complete", 0.1)]
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 2 and all(m.startswith("pool: not an event of the worker channel") for m in errors)
    finally:
        pool.close()


def test_the_worker_keeps_a_garbled_command_for_its_loop_to_log(caplog: pytest.LogCaptureFixture) -> None:
    pool = channel.PoolEnd()
    events_fd, control_fd, pulse_fd = pool.child_fds()
    worker = channel.WorkerEnd(events_fd, control_fd, pulse_fd)
    try:
        pool.send(NeverStart("a b"))
        os.write(pool.control_write, b"i j someday\n")
        pool.send(Interrupt("j", Reason.LOST))
        # Read in a signal handler, which must not log: the reasons wait in `unreadable`.
        with caplog.at_level(logging.ERROR, logger="skunkqueue.channel"):
            assert worker.commands() == [NeverStart("a b"), Interrupt("j", Reason.LOST)]
            assert not caplog.records and len(worker.unreadable) == 1
            channel.log_unreadable(worker.unreadable, "worker w1")
        assert [r.getMessage()[:50] for r in caplog.records] == ["worker w1: not a command of the pool channel: 'i j"]
        assert worker.unreadable == []
    finally:
        pool.close()


def test_a_partial_line_waits_for_its_end() -> None:
    pool = channel.PoolEnd()
    events_fd, _, _ = pool.child_fds()
    try:
        line = encode(Claimed(5.0, "job", 2, 1.5)).encode() + b"\n"
        os.write(events_fd, line[:7])
        assert pool.events() == []
        os.write(events_fd, line[7:])
        assert pool.events() == [Claimed(5.0, "job", 2, 1.5)]
    finally:
        pool.close()
