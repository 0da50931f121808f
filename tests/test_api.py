"""The library under the CLI: `sdrecipe.api`'s reports are what `--json`
prints, its events are what a build did, and one status answer serves
build, plan and status alike."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import invoke, write_recipe
from sdrecipe import api
from sdrecipe.engine import events
from sdrecipe.errors import RecipeError
from sdrecipe.recipe.lock import lock_path, read_lock
from sdrecipe.synthetic import DEMO_MODELS, write_model_set


@pytest.fixture
def recipe(tmp_path, models):
    return write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {models["inpainting"]}, B: {models["finetune"]}, C: {models["base"]}}}
        nodes:
          inpaint: A + (B - C)
        outputs:
          inpaint: {{path: out/inpaint.safetensors, dtype: float16}}
        """,
    )


def without_times(data):
    """`data` without the fields that measure time, which differ between runs."""
    if isinstance(data, dict):
        return {k: without_times(v) for k, v in data.items() if k != "seconds"}
    if isinstance(data, list):
        return [without_times(v) for v in data]
    return data


def cli_json(*args):
    result = invoke(*args, "--json")
    assert result.exit_code in (0, 1), result.stderr
    return json.loads(result.stdout)


def test_build_report_and_events(recipe, isolated_cache):
    seen = []
    report = api.build([recipe], api.Options(cache_dir=isolated_cache), on_event=seen.append)
    assert report.ok and not report.failed
    (output,) = report.outputs
    assert (output.result, output.status) == ("built", "rebuild")
    assert output.merged == 1130 and output.size > 0 and len(output.digest) == 64
    assert report.cache.tensors_computed == 1130 and report.cache.bytes_written > 0
    kinds = [event.type for event in seen]
    assert kinds[0] == "build_started" and kinds[-1] == "build_finished"
    for kind in ("recipe_started", "node", "output_started", "output_finished", "progress"):
        assert kind in kinds, kind
    assert kinds.count("cache_miss") == 1130 and "cache_hit" not in kinds
    finished = seen[-1]
    assert finished.ok and finished.cache.tensors_computed == 1130 and finished.outputs == 1
    # Each event is one JSON object with its type.
    assert all(json.loads(json.dumps(e.to_json()))["type"] == e.type for e in seen)
    assert set(events.EVENT_TYPES) >= set(kinds)


def test_cli_json_is_the_api_report(recipe, isolated_cache):
    options = api.Options(cache_dir=isolated_cache)
    built = without_times(cli_json("build", str(recipe)))
    assert built["outputs"][0]["result"] == "built"
    # Up to date: the API and the CLI answer the same, from the lock alone.
    assert without_times(cli_json("build", str(recipe))) == without_times(
        api.build([recipe], options).to_json()
    )
    assert cli_json("plan", str(recipe)) == api.plan([recipe], options).to_json()
    assert cli_json("status", str(recipe)) == api.status([recipe], options).to_json()
    verified = api.verify([recipe], options).to_json()
    assert cli_json("verify", str(recipe)) == verified
    assert verified["reproducible"] and verified["outputs"][0]["recipe"] == str(recipe)


def test_one_shape_whichever_path_answers(recipe, isolated_cache, tmp_path):
    options = api.Options(cache_dir=isolated_cache)
    first = api.build([recipe], options).to_json()
    current = api.build([recipe], options).to_json()  # proven current from the lock
    (tmp_path / "out" / "inpaint.safetensors").unlink()
    restored = api.build([recipe], options).to_json()  # planned, restored from the cache
    shapes = {
        json.dumps(sorted(r)) + json.dumps(sorted(r["outputs"][0])) + json.dumps(sorted(r["cache"]))
        for r in (first, current, restored)
    }
    assert len(shapes) == 1
    assert [r["outputs"][0]["result"] for r in (first, current, restored)] == [
        "built",
        "up to date",
        "restored from cache",
    ]
    assert current["outputs"][0]["merged"] is None and restored["outputs"][0]["merged"] == 1130


def test_a_comment_or_formatting_edit_leaves_outputs_up_to_date(recipe, isolated_cache):
    options = api.Options(cache_dir=isolated_cache)
    api.build([recipe], options)
    text = recipe.read_text()
    recipe.write_text("# the inpainting transplant\n" + text.replace(": ", ":    ") + "\n\n")
    assert yaml.safe_load(recipe.read_text()) == yaml.safe_load(text)
    (line,) = api.status([recipe], options).outputs
    assert (line.status, line.reason) == ("up to date", "output matches the lock")
    (output,) = api.build([recipe], options).outputs
    assert output.result == "up to date" and output.merged is None  # no planning needed
    # A change of meaning is not a formatting edit.
    recipe.write_text(text.replace("A + (B - C)", "A + 0.5 * (B - C)"))
    (line,) = api.status([recipe], options).outputs
    assert line.status == "rebuild"


def test_status_of_an_up_to_date_recipe_reads_no_model(recipe, isolated_cache):
    api.build([recipe], api.Options(cache_dir=isolated_cache))
    script = (
        "import sys; from pathlib import Path; from sdrecipe import api; "
        f"r = api.status([{str(recipe)!r}], api.Options(cache_dir=Path({str(isolated_cache)!r}))); "
        "print(r.outputs[0].status, 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.stdout.split() == ["up", "to", "date", "False"], result.stderr


def test_events_file_holds_every_event_as_json_lines(recipe, tmp_path):
    written = tmp_path / "events.jsonl"
    assert invoke("build", "--events", str(written), str(recipe)).exit_code == 0
    lines = [json.loads(line) for line in written.read_text().splitlines()]
    assert lines[0]["type"] == "build_started" and lines[-1]["type"] == "build_finished"
    assert all("type" in line for line in lines)
    finished = [line for line in lines if line["type"] == "output_finished"]
    assert finished[0]["result"] == "built" and finished[0]["output"] == "inpaint"
    # A second build replaces its own events file.
    assert invoke("build", "--events", str(written), str(recipe)).exit_code == 0
    again = [json.loads(line)["type"] for line in written.read_text().splitlines()]
    assert again.count("output_finished") == 1 and "cache_miss" not in again


@pytest.mark.parametrize(
    ("events", "message"),
    [
        ("recipe.yaml", "is the recipe"),
        ("recipe.lock", "is the recipe's lock file"),  # not there yet: the build would read it
        ("out/inpaint.safetensors", "is output 'inpaint'"),  # nor this, which the build writes
        ("cache/events.jsonl", "lies inside the cache folder"),
        ("notes.txt", "exists and is not an events file sdrecipe wrote"),
        ("fifo", "exists and is not a regular file"),  # reading it would wait for ever
        ("nowhere/events.jsonl", "lies in nowhere, which is not a folder"),
    ],
)
def test_events_file_never_touches_what_the_build_reads_or_writes(
    recipe, tmp_path, monkeypatch, events, message
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("my notes\n")
    os.mkfifo(tmp_path / "fifo")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = invoke("build", "--events", events, "--cache-dir", "cache", "recipe.yaml")
    assert result.exit_code == 2, result.output
    assert f"--events {events} {message}" in result.stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert invoke("build", "--events", "e.jsonl", "--dry-run", "recipe.yaml").exit_code == 2


def test_the_api_takes_one_target_or_many_and_paths_as_text(recipe, isolated_cache):
    options = api.Options(cache_dir=str(isolated_cache))
    assert options.cache_dir == isolated_cache
    one = api.build(str(recipe), options).outputs
    assert [o.result for o in one] == ["built"]
    assert api.status(recipe, options).outputs[0].status == "up to date"
    assert api.plan([str(recipe)], options).nodes[0].status == "up to date"
    assert api.validate(str(recipe), options).valid


def test_keep_going_reports_failures_in_the_one_shape(tmp_path, models, isolated_cache):
    folder = tmp_path / "recipes"
    folder.mkdir()
    write_recipe(
        folder,
        f"inputs: {{A: {models['base']}}}\nnodes: {{m: A}}\noutputs: {{m: ../a.safetensors}}\n",
        "a.yaml",
    )
    write_recipe(
        folder,
        "inputs: {A: gone.safetensors}\nnodes: {m: A}\noutputs: {m: ../b.safetensors}\n",
        "b.yaml",
    )
    options = api.Options(cache_dir=isolated_cache, keep_going=True)
    report = api.build([folder], options)
    assert not report.ok
    assert [o.recipe for o in report.outputs] == [str(folder / "a.yaml")]
    (failure,) = report.failed
    assert failure.recipe == str(folder / "b.yaml") and "does not exist" in failure.error
    with pytest.raises(RecipeError, match="does not exist"):
        api.build([folder], api.Options(cache_dir=isolated_cache))


def test_locks_that_call_identities_keys_are_still_read(recipe, isolated_cache):
    options = api.Options(cache_dir=isolated_cache)
    api.build([recipe], options)
    data = yaml.safe_load(lock_path(recipe).read_text())
    assert data["format"] == 3 and "identity" in data["outputs"]["inpaint"]
    data["format"] = 2
    for entry in (*data["nodes"].values(), *data["outputs"].values()):
        entry["key"] = entry.pop("identity")
    lock_path(recipe).write_text(yaml.safe_dump(data))
    old = read_lock(recipe)
    assert old.outputs["inpaint"].identity == data["outputs"]["inpaint"]["key"]
    (output,) = api.build([recipe], options).outputs
    assert output.result == "up to date"


def test_the_readme_example_runs(tmp_path, monkeypatch, capsys):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("## Python API") :]
    example = section[section.index("```python\n") + 10 : section.index("```\n", 10)]
    (tmp_path / "recipes").mkdir()
    shutil.copy(
        Path(__file__).parent.parent / "recipes" / "demo_inpaint.yaml", tmp_path / "recipes"
    )
    write_model_set(tmp_path / "build" / "demo", DEMO_MODELS, 32)
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "inpaint built build/demo/finetune-inpainting.safetensors" in printed
    assert "'status': 'up to date'" in printed and "inpaint up to date" in printed
    assert "Status." not in printed, "reports hold plain data"


def test_an_edit_that_changes_the_bytes_is_never_taken_for_formatting(
    tmp_path, models, isolated_cache
):
    options = api.Options(cache_dir=isolated_cache)
    text = f"""
        inputs: {{A: {models["base"]}, B: {models["finetune"]}}}
        nodes:
          mix: weighted_sum(A, B, alpha=0.3)
        outputs:
          mix: {{path: out.safetensors, metadata: {{version: 1.0, approved: yes, by: me}}}}
        """
    recipe = write_recipe(tmp_path, text)
    api.build([recipe], options)
    # Kept as written in the file's metadata: 1.0 and 1.00 differ, as do key orders.
    for old, new in (("1.0", "1.00"), ("approved: yes, by: me", "by: me, approved: yes")):
        recipe.write_text(recipe.read_text().replace(old, new))
        (line,) = api.status([recipe], options).outputs
        assert line.status != "up to date", new
        api.build([recipe], options)
        assert api.verify([recipe], options).reproducible


def lock_with(recipe, change):
    data = yaml.safe_load(lock_path(recipe).read_text())
    change(data)
    lock_path(recipe).write_text(yaml.safe_dump(data))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["outputs"]["inpaint"].update(digest=None), "output 'inpaint''s digest"),
        (lambda d: d["nodes"]["inpaint"].update(expression=5), "node 'inpaint''s expression"),
        (lambda d: d["inputs"]["A"].update(sha256="../../x"), "input 'A''s sha256"),
        (lambda d: d["outputs"]["inpaint"].update(size=True), "output 'inpaint'"),
    ],
)
def test_a_lock_holding_what_sdrecipe_never_writes_is_refused(
    recipe, isolated_cache, change, message
):
    options = api.Options(cache_dir=isolated_cache)
    api.build([recipe], options)
    lock_with(recipe, change)
    for command in ("status", "build", "plan", "verify"):
        result = invoke(command, str(recipe))
        assert result.exit_code == 2, (command, result.output)
        assert f"the lock file is malformed ({message} is not what sdrecipe writes" in result.stderr


def test_a_lock_is_read_with_the_recipe_loaders_bounds(recipe, isolated_cache):
    api.build([recipe], api.Options(cache_dir=isolated_cache))
    anchors = "".join(
        f"x{i}: &x{i} [{', '.join([f'*x{i - 1}' if i else 'a'] * 9)}]\n" for i in range(10)
    )
    lock_path(recipe).write_text(anchors + lock_path(recipe).read_text())
    result = invoke("verify", str(recipe))
    assert result.exit_code == 2 and "cannot read the lock file" in result.stderr


def test_a_failing_listener_never_leaves_outputs_half_published(tmp_path, models, isolated_cache):
    options = api.Options(cache_dir=isolated_cache)
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {models["base"]}, B: {models["finetune"]}}}
        nodes: {{one: "weighted_sum(A, B, alpha=0.3)", two: "weighted_sum(B, A, alpha=0.3)"}}
        outputs: {{one: one.safetensors, two: two.safetensors}}
        """,
    )
    api.build([recipe], options)
    first = {name: (tmp_path / f"{name}.safetensors").read_bytes() for name in ("one", "two")}
    recipe.write_text(recipe.read_text().replace("0.3", "0.6"))
    api.build([recipe], options)
    recipe.write_text(recipe.read_text().replace("0.6", "0.3"))  # both come from the cache

    def fail_on_restore(event):
        if isinstance(event, events.CacheHit) and event.what == "output":
            raise RuntimeError("listener failed")

    with pytest.raises(RuntimeError, match="listener failed"):
        api.build([recipe], options, on_event=fail_on_restore)
    assert {n: (tmp_path / f"{n}.safetensors").read_bytes() for n in first} == first
    assert api.status([recipe], options).outputs[0].status == "up to date"


def test_the_command_line_starts_without_the_merge_machinery():
    script = (
        "import sys, sdrecipe.cli; print(sorted({'numpy', 'torch', 'networkx'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.stdout.strip() == "[]", result.stderr
