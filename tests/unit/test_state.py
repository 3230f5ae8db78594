"""state.py: what a state file that cannot be trusted gives (None and one warning), and that a
failed save leaves the previous file and no temporary file behind."""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zddd.state import SavedState, StateFile

CORRUPT = {
    "empty": b"",
    "truncated": b'{"target": "ma',
    "not-json": b"\x00\xff garbage",
    "not-utf8": b'{"target": "\xff"}',
    "a-list": b'["main"]',
    "no-target": b'{"draining": ""}',
    "unknown-target": b'{"target": "Main"}',
    "non-ascii-target": '{"target": "été"}'.encode(),
    "target-not-a-string": b'{"target": 1}',
    "target-a-list": b'{"target": ["main"]}',
    "draining-unknown": b'{"target": "off", "draining": "off"}',
    "draining-but-not-off": b'{"target": "main", "draining": "backup"}',
    "deadline-a-string": b'{"target": "off", "draining": "main", "drain_deadline": "soon"}',
    "deadline-nan": b'{"target": "off", "draining": "main", "drain_deadline": NaN}',
    "answered-a-string": b'{"target": "off", "draining": "main", "drain_answered": "no"}',
    "timestamp-a-float": b'{"target": "main", "last_switch_timestamp": 1.5}',
    "timestamp-negative": b'{"target": "main", "last_switch_timestamp": -1}',
    "timestamp-a-bool": b'{"target": "main", "last_switch_timestamp": true}',
    "caller-not-a-string": b'{"target": "main", "last_switch_caller": 0}',
    "drain-caller-not-a-string": b'{"target": "off", "draining": "main", "drain_caller": []}',
    "deep": b"[" * 100000,
    "huge": b'{"target": "main", "pad": "' + b"x" * 2_000_000 + b'"}',
}


@pytest.mark.parametrize("raw", CORRUPT.values(), ids=CORRUPT.keys())
def test_a_corrupt_file_is_ignored_with_one_warning(tmp_path, caplog, raw):
    path = tmp_path / "state.json"
    path.write_bytes(raw)
    with caplog.at_level(logging.WARNING, logger="zddd"):
        assert StateFile(str(path)).load() is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("event=state_file_ignored"), lines


def test_a_directory_in_its_place_is_ignored_with_a_warning(tmp_path, caplog):
    path = tmp_path / "state.json"
    path.mkdir()
    with caplog.at_level(logging.WARNING, logger="zddd"):
        assert StateFile(str(path)).load() is None
    assert "state_file_ignored" in caplog.text and "directory" in caplog.text


def test_a_missing_file_is_silent(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="zddd"):
        assert StateFile(str(tmp_path / "none.json")).load() is None
    assert caplog.text == ""


@pytest.mark.parametrize("state", [SavedState("main"), SavedState("off"),
                                   SavedState("off", "backup", 1e9, True)])
def test_what_is_saved_loads_back(tmp_path, state):
    store = StateFile(str(tmp_path / "sub" / "state.json"))
    store.save(state)
    assert store.load() == {"default": state}


def test_a_failed_save_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    store = StateFile(str(tmp_path / "state.json"))
    store.save(SavedState("main"))
    before = (tmp_path / "state.json").read_bytes()
    target = tmp_path / "state.json"
    target.unlink()
    target.mkdir()  # os.replace onto a directory fails, even for root
    with pytest.raises(OSError):
        store.save(SavedState("backup"))
    target.rmdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    target.write_bytes(before)
    assert store.load() == {"default": SavedState("main")}


def test_the_saved_file_is_not_writable_by_others(tmp_path):
    old = os.umask(0)  # even with a careless umask
    try:
        StateFile(str(tmp_path / "new" / "dir" / "state.json")).save(SavedState("main"))
    finally:
        os.umask(old)
    for path in (tmp_path / "new", tmp_path / "new" / "dir", tmp_path / "new" / "dir" /
                 "state.json"):
        mode = path.stat().st_mode
        assert not mode & (stat.S_IWOTH | stat.S_IWGRP), (path, oct(mode))


@settings(max_examples=200, deadline=1000)
@given(raw=st.binary(max_size=300) | st.builds(
    lambda d: json.dumps(d).encode(),
    st.dictionaries(st.sampled_from(["target", "draining", "drain_deadline", "drain_answered",
                                     "x"]),
                    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
                    | st.sampled_from(["main", "backup", "off", ""]), max_size=5)))
def test_any_file_loads_as_a_valid_state_or_none(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("st") / "state.json"
    path.write_bytes(raw)
    states = StateFile(str(path)).load()
    for state in (states or {}).values():
        assert state.target in ("main", "backup", "off")
        assert state.draining in ("", "main", "backup")
        assert not state.draining or state.target == "off"
        assert isinstance(state.drain_answered, bool)


def test_a_file_from_before_the_last_switch_fields_still_reads(tmp_path):
    path = tmp_path / "state.json"
    path.write_text('{"target": "off", "draining": "main", "drain_deadline": 5.0, '
                    '"drain_answered": true}\n')
    assert StateFile(str(path)).load() == {
        "default": SavedState("off", "main", 5.0, drain_answered=True)}


def test_the_last_switch_round_trips(tmp_path):
    store = StateFile(str(tmp_path / "state.json"))
    state = SavedState("backup", last_switch_timestamp=1_765_000_000_123_456,
                       last_switch_caller="uid=1000 ssh=alice@198.51.100.7")
    store.save(state)
    assert store.load() == {"default": state}
