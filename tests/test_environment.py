"""environment.json: which machine setup trained a run, and the report's account of an ablation's setups."""
from __future__ import annotations

import json

import pytest
import torch

from lightning_clip import environment
from lightning_clip.report.load import load_runs
from lightning_clip.report import machines


def machine_lines(root, cells, label=""):
    return machines.machine_lines(load_runs(root, cells), label)


def setups_of(root, cells):
    return machines.setups_of(load_runs(root, cells))


def test_describe_reports_this_process_setup():
    d = environment.describe(world_size=2)
    assert d["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert d["threads"] == torch.get_num_threads() and d["world_size"] == 2
    assert d["torch"] == torch.__version__
    assert d["device"] == "cpu"  # the device it trains on, by default the CPU, whether or not a GPU is present
    assert environment.describe(device=torch.device("cpu"))["device"] == "cpu"
    assert d["cpu"] and (len(d["cpu_flags"]) == 8 or d["cpu_flags"] == "unknown")
    assert set(environment.SETUP_FIELDS) <= set(d)


def test_setup_key_changes_with_every_field_that_changes_the_numbers_and_no_other():
    base = environment.describe()
    key = environment.setup_key(base)
    for field in environment.SETUP_FIELDS:
        other = dict(base, **{field: f"{base[field]}-other"})
        assert environment.setup_key(other) != key, field
    # when and from which step a fit started, the Python patch level and the core count do not
    assert environment.setup_key(dict(base, started="later", start_step=7, python="9.9", cores=64)) == key


def test_records_are_appended_per_resumed_fit_and_a_new_run_starts_afresh(tmp_path):
    assert environment.read_records(tmp_path) == []          # a run from before the records existed
    environment.record(tmp_path, step=0)
    environment.record(tmp_path, step=120)
    environment.record(tmp_path, step=240)
    assert [f["start_step"] for f in environment.read_records(tmp_path)] == [0, 120, 240]
    environment.record(tmp_path, step=0)                      # started over in the same folder
    assert [f["start_step"] for f in environment.read_records(tmp_path)] == [0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["environment.json"]  # no temporary file left


@pytest.mark.parametrize("text", ["", "{", '{"fits": 3}', '{"other": []}', '{"fits": [1]}'])
def test_a_damaged_record_is_an_error_that_names_the_file(tmp_path, text):
    (tmp_path / "environment.json").write_text(text)
    with pytest.raises(ValueError, match=r"environment\.json: unreadable environment record"):
        environment.read_records(tmp_path)


# -- the report's section ---------------------------------------------------------------------------------
def _run(root, cell, seed, setups=(), finished=True):
    run = root / cell / f"seed_{seed}"
    run.mkdir(parents=True)
    if finished:
        (run / "final_metrics.json").write_text("{}")
    if setups:
        fits = [dict(environment.describe(), **s, start_step=i) for i, s in enumerate(setups)]
        (run / "environment.json").write_text(json.dumps({"fits": fits}))


def test_one_setup_is_one_line(tmp_path):
    for cell in ("a", "b"):
        for seed in (0, 1):
            _run(tmp_path, cell, seed, [{}])
    _run(tmp_path, "a", 2, [{"cpu_capability": "other"}], finished=False)  # unfinished: not in the table
    (tmp_path / "a" / "seed_\u00b2").mkdir()                   # not a seed folder (a Unicode digit)
    (tmp_path / "a" / "seed_\u00b2" / "final_metrics.json").write_text("{}")
    (line,) = machine_lines(tmp_path, ["a", "b"])
    assert line == f"Machine: all 4 runs trained on {environment.setup_key(environment.describe())}."


def test_mixed_setups_are_listed_with_their_cells_and_seeds(tmp_path):
    base = environment.describe()
    for seed in range(3):
        _run(tmp_path, "a", seed, [{}])
    _run(tmp_path, "b", 0, [{}])
    _run(tmp_path, "b", 10, [{"cpu_capability": f"{base['cpu_capability']}-other"}])  # never this machine's
    _run(tmp_path, "b", 2)                                           # unrecorded
    _run(tmp_path, "b", 1, [{}, {"threads": base["threads"] + 1}])   # resumed on another setup
    here = environment.setup_key(base)
    avx2 = environment.setup_key(dict(base, cpu_capability=f"{base['cpu_capability']}-other"))
    setups = setups_of(tmp_path, ["a", "b"])
    assert setups[here] == {"a": [0, 1, 2], "b": [0]}
    assert setups[avx2] == {"b": [10]}
    assert setups["not recorded"] == {"b": [2]}
    (resumed,) = [k for k in setups if " then " in k]
    assert resumed.startswith(here) and setups[resumed] == {"b": [1]}
    lines = machine_lines(tmp_path, ["a", "b"], label="tuned")
    assert lines[0] == "## Machines: tuned" and "The 7 runs were trained on 4 setups" in lines[2]
    assert f"| {here} | `a` seeds 0, 1, 2; `b` seed 0 |" in lines
    assert f"| {avx2} | `b` seed 10 |" in lines and "| not recorded | `b` seed 2 |" in lines


def test_no_record_at_all_says_so_and_no_run_says_nothing(tmp_path):
    assert machine_lines(tmp_path, ["a"]) == []
    _run(tmp_path, "a", 0)
    assert machine_lines(tmp_path, ["a"], label="default recipe") == [
        "Machine (default recipe): not recorded for the 1 run (trained before runs kept environment.json)."]


def test_a_full_disk_at_the_record_names_the_file_and_keeps_the_earlier_records(tmp_path, monkeypatch):
    import errno
    import os

    environment.record(tmp_path, step=0)
    before = (tmp_path / "environment.json").read_text()

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError) as e:
        environment.record(tmp_path, step=50)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "environment.json")
    assert (tmp_path / "environment.json").read_text() == before


def test_one_run_reads_as_one_run(tmp_path):
    _run(tmp_path, "a", 0, [{}])
    assert machine_lines(tmp_path, ["a"]) == [
        f"Machine: 1 run trained on {environment.setup_key(environment.describe())}."]


def test_steps_trained_before_the_first_record_are_not_recorded(tmp_path):
    here = environment.setup_key(environment.describe())
    # resumed (step 300) in a folder with no record: a placeholder for steps 0-299 comes first
    run = tmp_path / "a" / "seed_0"
    run.mkdir(parents=True)
    (run / "final_metrics.json").write_text("{}")
    environment.record(run, step=300)
    fits = environment.read_records(run)
    assert fits[0]["unrecorded"] and fits[0]["start_step"] == 0 and fits[1]["start_step"] == 300
    # a file whose first record starts after step 0 (written without the placeholder) reads the same way
    _run(tmp_path, "a", 1, [{}])
    path = tmp_path / "a" / "seed_1" / "environment.json"
    data = json.loads(path.read_text())
    data["fits"][0]["start_step"] = 120
    path.write_text(json.dumps(data))
    assert setups_of(tmp_path, ["a"]) == {f"not recorded then {here}": {"a": [0, 1]}}


def test_a_damaged_record_is_moved_aside_on_resume_and_its_steps_count_as_unrecorded(tmp_path):
    (tmp_path / "environment.json").write_text("{ cut short")
    environment.record(tmp_path, step=50)
    assert (tmp_path / "environment.damaged.json").read_text() == "{ cut short"   # kept, not deleted
    first, second = environment.read_records(tmp_path)
    assert "environment.damaged.json" in first["unrecorded"] and second["start_step"] == 50
    assert environment.setup_key(first) == "not recorded"
