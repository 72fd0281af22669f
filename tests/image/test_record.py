"""`stargz.optimize.record`: the JSON-lines record Go's ``ctr-remote`` writes and reads,
and ``stargz convert --record-in``. Go 0.12 writes one line per fanotify event, so a path
may repeat; a line without ``layerIndex`` applies to every layer that has the path."""

from __future__ import annotations

import shutil

import pytest

from stargz.cli.main import main
from stargz.errors import InvalidArgument
from stargz.estargz import open_file
from stargz.estargz.toc import PREFETCH_LANDMARK
from stargz.image.layout import Layout
from stargz.optimize import record

M = "sha256:" + "5" * 64


def test_go_record_with_repeats_is_read_in_order(tmp_path):
    p = tmp_path / "rec.json"
    p.write_text(
        f'{{"path":"bin/busybox","manifestDigest":"{M}","layerIndex":0}}\n'
        f'{{"path":"/bin/busybox","manifestDigest":"{M}","layerIndex":0}}\n'
        f'{{"path":"etc/./greeting","manifestDigest":"{M}","layerIndex":1}}\n'
        '{"path":"usr/lib/x"}\n'
    )
    entries = record.read(str(p))
    assert entries[2] == record.Entry("etc/greeting", M, 1)
    assert record.layer_files(entries, 3) == {
        0: ["bin/busybox", "usr/lib/x"],
        1: ["etc/greeting", "usr/lib/x"],
        2: ["usr/lib/x"],
    }
    out = tmp_path / "out.json"
    record.write(str(out), entries[2:])
    assert out.read_text() == (
        f'{{"path":"etc/greeting","manifestDigest":"{M}","layerIndex":1}}\n{{"path":"usr/lib/x"}}\n'
    )


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "rec.json:1: not JSON"),
        ('{"path": 3}', 'rec.json:1: not a record entry (needs a "path" string)'),
        ('{"path": "a", "layerIndex": -1}', "rec.json:1: layerIndex -1 is not a layer index"),
    ],
)
def test_bad_records_name_the_line(tmp_path, line, message):
    p = tmp_path / "rec.json"
    p.write_text(line + "\n")
    with pytest.raises(InvalidArgument) as e:
        record.read(str(p))
    assert message in str(e.value)


def test_a_layer_index_past_the_image_is_refused():
    with pytest.raises(InvalidArgument, match="layer 4 but the image has 1"):
        record.layer_files([record.Entry("a", M, 4)], 1)


def test_convert_record_in_puts_the_recorded_files_first(busybox, tmp_path, capsys):
    layout = tmp_path / "bb"
    shutil.copytree(busybox.root, layout)
    for p in [layout, *layout.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)
    rec = tmp_path / "rec.json"
    rec.write_text('{"path":"etc/greeting"}\n{"path":"bin/busybox"}\n{"path":"no/such"}\n')
    assert (
        main(["convert", "-q", "--record-in", str(rec), f"oci:{layout}:1", f"oci:{layout}:r"]) == 0
    )
    lay = Layout(str(layout))
    man = lay.read_json(lay.resolve("r")["digest"])
    with open_file(lay.blob_path(man["layers"][0]["digest"])) as r:
        names = [e.name for e in r.toc.entries]
    assert names[: names.index(PREFETCH_LANDMARK) + 1] == [
        "",
        "etc",
        "etc/greeting",
        "bin",
        "bin/busybox",
        PREFETCH_LANDMARK,
    ]
    bad = tmp_path / "bad.json"
    bad.write_text("{\n")
    assert main(["convert", "--record-in", str(bad), f"oci:{layout}:1", f"oci:{layout}:x"]) == 1
    assert capsys.readouterr().err.startswith("stargz: error: ")
