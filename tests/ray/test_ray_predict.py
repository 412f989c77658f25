"""Issue 18 item 2: Ray Data batch prediction equals `transfgu predict` image by image, exactly once, resumable."""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from transfgu.data.io import load_label
from transfgu.distributed.predict import PredictActor, list_inputs, predict_ray, read_ledger
from transfgu.predict import main as predict_main

pytestmark = pytest.mark.ray


class KillAfterWrite(PredictActor):
    """Dies (SIGKILL) right after writing the ledger file of its first batch, once per marker file."""

    #: Set by the module's fixture; the class travels to the actors by value, with it.
    kill_marker: str | None = None

    def __call__(self, batch):
        out = super().__call__(batch)
        marker = self.kill_marker
        if marker:
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return out
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)
        return out


@pytest.fixture(scope="module")
def local_ray(ray_local, tmp_path_factory):
    """The shared local Ray, and the marker file of the one actor kill (it exists once an actor died)."""
    from ray import cloudpickle

    marker = tmp_path_factory.mktemp("kill") / "killed"
    KillAfterWrite.kill_marker = str(marker)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actor subclass travels by value
    yield marker
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    KillAfterWrite.kill_marker = None


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, camvid):
    """Seven real CamVid images (one resized to another size, one in a sub-folder) and one corrupt file."""
    d = tmp_path_factory.mktemp("in")
    src = sorted((camvid / "images" / "val").glob("*.jpg"))[:6]
    for p in src[:5]:
        shutil.copy(p, d / p.name)
    (d / "sub").mkdir()
    img = Image.open(src[5]).convert("RGB")
    img.resize((173, 131)).save(d / "sub" / "small.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return d


@pytest.fixture(scope="module")
def cli_reference(tiny_run_dir, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    assert predict_main([str(tiny_run_dir), str(inputs), "--out", str(out), "--device", "cpu"]) == 0
    return out


def _assert_equal_to_cli(out: Path, ref: Path) -> None:
    ref_pngs = sorted(p.relative_to(ref) for p in ref.rglob("*.png"))
    assert len(ref_pngs) == 6
    assert sorted(p.relative_to(out) for p in out.rglob("*.png")) == ref_pngs
    table = read_ledger(out).to_pylist()
    rows = {r["stem"]: r for r in table}
    assert len(table) == len(rows) == 7  # every input exactly once, the broken one included
    assert rows["broken"]["error"] and rows["broken"]["label_png"] is None
    for rel in ref_pngs:
        expected = load_label(ref / rel)
        np.testing.assert_array_equal(load_label(out / rel), expected)
        r = rows[rel.with_suffix("").as_posix()]
        assert r["error"] is None and (r["height"], r["width"]) == expected.shape
        assert r["pixels"] == np.bincount(expected.ravel(), minlength=4).tolist()
    assert load_label(out / "sub" / "small.png").shape == (131, 173)


def test_batch_prediction_equals_the_cli_and_survives_a_killed_actor(local_ray, tiny_run_dir, inputs,
                                                                    cli_reference, tmp_path, caplog):
    out = tmp_path / "pred"
    caplog.set_level("WARNING", logger="transfgu.distributed.cluster")
    res = predict_ray(tiny_run_dir, [str(inputs)], out, batch_size=2, actors=(1, 1), cpus_per_actor=1.0,
                      decode_cpus=0.5, actor_cls=KillAfterWrite)
    assert local_ray.is_file() and int(local_ray.read_text()) != os.getpid()  # an actor process really died
    # not restarted by Ray: the images no ledger file holds went to a new pool, the dead actor's batch was kept
    assert "[predict] an actor of the pool died" in caplog.text
    assert res["n_inputs"] == 7 and res["n_predicted"] == 6 and res["n_errors"] == 1
    _assert_equal_to_cli(out, cli_reference)
    assert "broken.jpg" in (out / "errors.jsonl").read_text()

    # resume: nothing to do, then only the images of a lost ledger file are predicted again
    again = predict_ray(tiny_run_dir, [str(inputs)], out, batch_size=2, actors=(1, 1))
    assert again["n_predicted"] == 0 and again["n_kept"] == 7
    files = sorted((out / "predictions").glob("part-*.parquet"))
    lost = pq.read_table(files[0])["stem"].to_pylist()
    files[0].unlink()
    for stem in lost:
        (out / f"{stem}.png").unlink(missing_ok=True)
    redo = predict_ray(tiny_run_dir, [str(inputs)], out, batch_size=2, actors=(1, 1))
    assert redo["n_kept"] == 7 - len(lost) and redo["n_predicted"] + redo["n_errors"] == len(lost)
    _assert_equal_to_cli(out, cli_reference)


def test_cli_ray_flag_with_a_glob_and_a_file_uri(local_ray, tiny_run_dir, inputs, cli_reference, tmp_path):
    import logging

    from transfgu.cli import main

    class Keep(logging.Handler):  # the run's own lines, whatever stream an earlier test left the console handler on
        def __init__(self) -> None:
            super().__init__(logging.INFO)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    keep, ours = Keep(), logging.getLogger("transfgu")
    ours.addHandler(keep)
    out = tmp_path / "pred"
    uris = [f"file://{p}" for p in sorted(inputs.glob("*.jpg"))]  # single objects: stem = file name
    try:
        rc = main(["predict", str(tiny_run_dir), str(inputs / "**" / "*.png"), *uris, "--out", str(out),
                   "--ray", "--batch-size", "3", "--actors", "1,1"])
    finally:
        ours.removeHandler(keep)
    assert rc == 0
    _assert_equal_to_cli(out, cli_reference)
    # not silent while it runs: without a terminal, status lines, then the final count
    n = len(uris) + 1
    assert any(m.startswith(f"[predict] {n}/{n} (100.0%)") for m in keep.messages), keep.messages


def test_list_inputs_forms(inputs, tmp_path):
    folder = list_inputs([str(inputs)])
    assert [s for _, s in folder] == sorted(s for _, s in folder) and "sub/small" in dict((s, p) for p, s in folder)
    glob_ = list_inputs([str(inputs / "**" / "*.png")])
    assert [s for _, s in glob_] == ["sub/small"]
    uri = list_inputs([f"file://{inputs}"])
    assert sorted(s for _, s in uri) == sorted(s for _, s in folder)
    lst = tmp_path / "list.txt"
    lst.write_text(f"# two of them\n{inputs / 'sub' / 'small.png'}\n\n{inputs / 'broken.jpg'}\n")
    assert [s for _, s in list_inputs([str(lst)])] == ["small", "broken"]
    both = list_inputs([str(inputs / "sub"), str(inputs / "sub" / "small.png")])  # same stem twice: made unique
    assert len({s for _, s in both}) == 2
    with pytest.raises(FileNotFoundError):
        list_inputs([str(inputs / "*.tif")])


def test_ledger_sources_are_absolute_paths(inputs, monkeypatch):
    monkeypatch.chdir(inputs.parent)
    rel = inputs.name
    for form in ([rel], [f"{rel}/**/*.png"], [f"{rel}/sub/small.png"]):
        found = list_inputs(form)
        assert found and all(Path(src).is_absolute() and Path(src).is_file() for src, _ in found), (form, found)
    assert dict((s, p) for p, s in list_inputs([rel]))["sub/small"] == str((inputs / "sub" / "small.png").resolve())


def test_summary_names_the_error_list_only_when_there_is_one(tmp_path):
    from transfgu.distributed.predict import summary_line

    res = {"n_predicted": 3, "n_kept": 0, "n_errors": 0, "ledger": str(tmp_path / "predictions")}
    line = summary_line(res, tmp_path)
    assert "errors.jsonl" not in line and "3 images labelled (0 already done, 0 unreadable)" in line
    (tmp_path / "errors.jsonl").write_text('{"file": "x.jpg"}\n')
    line = summary_line({**res, "n_errors": 1}, tmp_path)
    assert f"1 unreadable: see {(tmp_path / 'errors.jsonl').resolve()}" in line
