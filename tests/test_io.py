"""Output folders: the run lock (one fopro process per folder, stale locks taken over) and the folder checks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fopro.errors import FoproError
from fopro.io import LOCK_NAME, check_output_folder, folder_lock


def test_a_held_lock_stops_a_second_process(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with folder_lock(run, "--out"):
        assert (run / LOCK_NAME).read_text() == str(os.getpid())
        with pytest.raises(FoproError, match=f"--out {run} is in use by fopro process {os.getpid()}"):
            with folder_lock(run, "--out"):
                pass
        assert (run / LOCK_NAME).exists(), "the loser leaves the winner's lock alone"
    assert not run.exists(), "a folder the lock created and nothing filled is removed"


def test_a_stale_lock_is_taken_over_even_when_its_process_id_is_reused(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    # a dead process's id, and a live one's (this process: a container restarted under the same id): neither holds it
    for stale in (gone.pid, os.getpid()):
        run = tmp_path / f"run{stale}"
        run.mkdir()
        (run / LOCK_NAME).write_text(str(stale))
        with folder_lock(run, "--out"):
            (run / "config.json").write_text("{}")
            assert (run / LOCK_NAME).read_text() == str(os.getpid())
        assert sorted(p.name for p in run.iterdir()) == ["config.json"]


HOLD_LOCK = """
import sys
from fopro.io import folder_lock
with folder_lock(sys.argv[1], "--out"):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_another_process_lock_stops_us_until_it_is_killed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FoproError, match=f"--out {run} is in use by fopro process {holder.pid}: wait"):
            with folder_lock(run, "--out"):
                pass
        holder.kill()  # kill -9: no clean-up runs, the lock file stays
        holder.wait()
        assert (run / LOCK_NAME).read_text() == str(holder.pid)
        with folder_lock(run, "--resume"):
            assert (run / LOCK_NAME).read_text() == str(os.getpid())
    finally:
        holder.kill()
        holder.wait()
    assert not (run / LOCK_NAME).exists()


def test_output_folders_under_a_file_or_inside_the_data(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FoproError, match="is under .*afile, which is a file"):
        check_output_folder(tmp_path / "afile" / "out", "--out")
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    for inside in (data, data / "train" / "run1"):
        with pytest.raises(FoproError, match="inside the data folder"):
            check_output_folder(inside, "--out", [None, data])
    check_output_folder(tmp_path / "runs" / "a", "--out", [data])  # beside the data: fine


def test_sigterm_asks_the_loop_to_save_and_stop() -> None:
    import signal

    from fopro.train import interrupt_flag

    before = signal.getsignal(signal.SIGTERM)
    with interrupt_flag() as flag:
        signal.raise_signal(signal.SIGTERM)
        assert flag["stop"] is True
    assert signal.getsignal(signal.SIGTERM) is before


def test_without_a_terminal_long_work_prints_a_line_now_and_then(monkeypatch, capsys) -> None:
    import fopro.cli.common as common

    monkeypatch.setattr(common, "LOG_SECONDS", 0.0)
    with common.progress_bar() as progress:
        progress("decoding", 1, 3)
        progress("decoding", 3, 3)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"decoding: 1/3 so far, 0:00:0\d elapsed, about 0:00:0\d left", lines[0]), lines[0]
    assert re.fullmatch(r"decoding: 3/3 done in 0:00:0\d", lines[1]), lines[1]


def test_plain_progress_lines_time_each_task_from_its_own_start(monkeypatch, capsys) -> None:
    """A task's elapsed time starts at its first report (the student's epoch 1 does not inherit the teacher's)."""
    import fopro.cli.common as common

    clock = iter([0.0, 100.0, 400.0, 400.0, 430.0])
    monkeypatch.setattr(common.time, "monotonic", lambda: next(clock))
    log = common.plain_progress_lines()
    log("teacher · epoch 1/6", 0, 10)
    log("teacher · epoch 1/6", 10, 10)
    log("student · epoch 1/6 [sup 1.000, 9 img/s]", 0, 4)
    log("student · epoch 1/6 [sup 0.900, 9 img/s]", 1, 4)  # not yet 30 s: no line
    log("student · epoch 1/6 [sup 0.800, 9 img/s]", 2, 4)
    assert capsys.readouterr().err.splitlines() == [
        "teacher · epoch 1/6: 10/10 done in 0:01:40",
        "student · epoch 1/6 [sup 0.800, 9 img/s]: 2/4 so far, 0:00:30 elapsed, about 0:00:30 left",
    ]


def test_control_characters_never_reach_the_terminal() -> None:
    from fopro.cli.common import printable

    assert printable("scan\x1b[2J\u202e.png ok") == "scan\\x1b[2J\\u202e.png ok"


def test_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path: Path) -> None:
    import errno

    from fopro.io import atomic_path, write_text

    target = tmp_path / "metrics.json"
    write_text(target, "old")
    with pytest.raises(FoproError, match=f"cannot write {target}: No space left on device"):
        with atomic_path(target):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
