"""What a restarted daemon reads before serving a kept FUSE connection: the INIT state kept
with the descriptor and the layer slot table. Both carry a format version, so a daemon
never serves a connection from a layout it does not know (an upgrade must keep reading
the old one; a downgrade starts afresh)."""

from __future__ import annotations

import json
import os

from stargz.fs import slots, takeover
from stargz.fs.slots import SlotTable
from stargz.fuse.handover import Kept


def test_the_kept_state_carries_its_format_and_a_newer_one_is_not_served(tmp_path):
    fd = os.open(os.devnull, os.O_RDONLY)
    try:
        newer = json.dumps({"format": takeover.STATE_FORMAT + 1}).encode()
        assert "newer" in takeover.check(Kept(fd, newer), str(tmp_path))
        for damaged in (b"[1, 2]", b"{", b'{"format": 1}'):
            assert takeover.check(Kept(fd, damaged), str(tmp_path)) == (
                "its INIT state is missing or damaged"
            )
    finally:
        os.close(fd)


def test_the_slot_table_round_trips_and_a_newer_format_reads_as_empty(tmp_path):
    path = str(tmp_path / "fuse-layers.json")
    table = SlotTable(path)
    table.reset()
    with open(path, "rb") as f:
        assert json.load(f)["format"] == slots.FORMAT
    doc = {"format": slots.FORMAT + 1, "next_slot": 9, "layers": {}}
    with open(path, "w") as f:
        json.dump(doc, f)
    again = SlotTable(path)
    again.load()
    assert again.next_slot == 1 and again.layers == {}
    # a file without a format (the first layout) still reads
    doc = {"next_slot": 4, "layers": {"src d": {"slot": 3, "name": "d", "labels": {}}}}
    with open(path, "w") as f:
        json.dump(doc, f)
    old = SlotTable(path)
    old.load()
    assert old.next_slot == 4 and old.layers["src d"].slot == 3
