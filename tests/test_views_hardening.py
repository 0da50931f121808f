"""Views under careless and crafted use (issue 26): view files never replace
what sdrecipe did not write, `diff` refuses what it cannot compare before any
work, `lineage` of crafted history stays small and one line per model, and
`inspect` / `methods` print what people read."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import SHRINK, invoke, write_recipe
from sdrecipe.synthetic import AdapterSpec, ModelSpec, write_adapter, write_model
from sdrecipe.views.model_diff import diff_models

# --- view files: the output guard's rules (issue 26, item 3)


def recipe_reading(folder: Path, a: Path, b: Path) -> Path:
    return write_recipe(
        folder,
        f"inputs: {{A: {a}, B: {b}}}\nnodes: {{m: 'weighted_sum(A, B, alpha=0.5)'}}\n"
        "outputs: {m: o.safetensors}\n",
    )


def test_graph_never_writes_into_an_input_diffusers_folder(tmp_path, models):
    config = tmp_path / "dif" / "unet" / "config.json"
    config.parent.mkdir(parents=True)
    config.write_text('{"sample_size": 64}')
    recipe = recipe_reading(tmp_path, tmp_path / "dif", models["base"])
    for forced in ((), ("--force",)):
        result = invoke("graph", str(recipe), "-o", str(config), *forced)
        assert result.exit_code == 2, result.stdout
        assert f"lies inside input 'A' ({tmp_path / 'dif'})" in result.stderr
        assert config.read_text() == '{"sample_size": 64}'


def test_graph_never_writes_over_an_input_model_or_into_the_cache(tmp_path, models):
    model = tmp_path / "model.png"
    shutil.copyfile(models["base"], model)
    before = model.read_bytes()
    recipe = recipe_reading(tmp_path, model, models["other"])
    for forced in ((), ("--force",)):
        refused = invoke("graph", str(recipe), "-o", str(model), *forced)
        assert refused.exit_code == 2 and "is input 'A'" in refused.stderr
        assert model.read_bytes() == before
    cache = tmp_path / "cache"
    cached = cache / "view.svg"
    cache.mkdir()
    into_cache = invoke("graph", str(recipe), "-o", str(cached), "--cache-dir", str(cache))
    assert into_cache.exit_code == 2 and "lies inside the cache folder" in into_cache.stderr
    assert not cached.exists()


@pytest.mark.parametrize("name", ["notes.json", "picture.svg", "flow.mmd", "graph.dot", "p.png"])
def test_a_view_replaces_only_a_view_that_sdrecipe_wrote(tmp_path, models, name):
    recipe = recipe_reading(tmp_path, models["base"], models["other"])
    mine = tmp_path / name
    mine.write_bytes(b"my own work\n")
    refused = invoke("graph", str(recipe), "-o", str(mine))
    assert refused.exit_code == 2
    assert "is not a" in refused.stderr and "--force" in refused.stderr
    assert mine.read_bytes() == b"my own work\n"
    assert invoke("graph", str(recipe), "-o", str(mine), "--force").exit_code == 0
    assert mine.read_bytes() != b"my own work\n"
    written = mine.read_bytes()
    again = invoke("graph", str(recipe), "-o", str(mine))
    assert again.exit_code == 0, again.stderr
    assert mine.read_bytes() == written, "the view sdrecipe wrote is replaced by the same view"


def test_written_views_are_still_valid_files(tmp_path, models):
    recipe = recipe_reading(tmp_path, models["base"], models["other"])
    for name in ("g.json", "g.png", "g.svg"):
        assert invoke("graph", str(recipe), "-o", str(tmp_path / name)).exit_code == 0
    data = json.loads((tmp_path / "g.json").read_text())
    assert data["generator"] == "sdrecipe view" and "node:m" in {v["id"] for v in data["vertices"]}
    stdout = json.loads(invoke("graph", str(recipe), "--format", "json").stdout)
    assert stdout == {key: value for key, value in data.items() if key != "generator"}
    with Image.open(tmp_path / "g.png") as image:
        assert image.format == "PNG" and image.text == {"Software": "sdrecipe view"}
    assert ET.parse(tmp_path / "g.svg").getroot().tag == "{http://www.w3.org/2000/svg}svg"


def test_diff_heatmap_never_replaces_a_model_or_an_unmarked_file(tmp_path, models):
    model = tmp_path / "finetune.png"
    shutil.copyfile(models["finetune"], model)
    before = model.read_bytes()
    for forced in ((), ("--force",)):
        over_model = invoke("diff", str(models["base"]), str(model), "--png", str(model), *forced)
        assert over_model.exit_code == 2 and "is a compared model" in over_model.stderr
        assert model.read_bytes() == before
    mine = tmp_path / "mine.svg"
    mine.write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    refused = invoke("diff", str(models["base"]), str(models["finetune"]), "--svg", str(mine))
    assert refused.exit_code == 2 and "no sdrecipe mark" in refused.stderr
    assert mine.read_text() == "<svg xmlns='http://www.w3.org/2000/svg'/>"
    heatmap = tmp_path / "heat.png"
    for _ in range(2):  # the second run replaces the heatmap the first wrote
        result = invoke("diff", str(models["base"]), str(models["finetune"]), "--png", str(heatmap))
        assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize(
    ("option", "name", "message"),
    [
        ("--svg", "heat.png", "a svg view is written to a .svg file"),
        ("--png", "heat.svg", "a png view is written to a .png file"),
        ("--svg", "missing/heat.svg", "the folder"),
    ],
)
def test_diff_checks_its_options_before_opening_a_model(tmp_path, models, option, name, message):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(models["finetune"].read_bytes()[:-1000])
    result = invoke("diff", str(models["base"]), str(truncated), option, str(tmp_path / name))
    assert result.exit_code == 2
    assert f"error: {tmp_path / name}: {message}" in result.stderr
    assert "truncated" not in result.stderr.replace(str(truncated), "")


# --- diff: families, and its sums (items 10 and 17)


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sdxl")
    return write_model(folder / "xl.safetensors", ModelSpec("sdxl", shrink=SHRINK, seed=1))


def test_diff_refuses_models_of_different_families_unless_forced(tmp_path, models, sdxl_model):
    heatmap = tmp_path / "heat.svg"
    result = invoke("diff", str(models["base"]), str(sdxl_model), "--json", "--svg", str(heatmap))
    assert result.exit_code == 2
    assert f"{sdxl_model} is sdxl and the reference {models['base']} is sd1" in result.stderr
    assert json.loads(result.stdout)["exit_code"] == 2
    assert not heatmap.exists()
    forced = invoke("diff", str(models["base"]), str(sdxl_model), "--json", "--force")
    assert forced.exit_code == 0
    assert json.loads(forced.stdout)["models"][0]["only_in_model"]


def test_diff_sums_on_one_thread_and_gives_the_threads_back(models):
    """Handing each tensor's short sums to other threads made a 33 MB diff take
    13-17 s on a shared machine; the sums run on the calling thread alone."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    seen: list[int] = []

    def progress(label: str, total: int):
        return lambda done: seen.append(torch.get_num_threads())

    try:
        result = diff_models(models["base"], [models["finetune"]], progress)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    assert len(seen) == 1131 and set(seen) == {1}
    assert result.comparisons[0].total.keys == 1131 - 1, "all floating keys (position_ids is not)"


# --- lineage of crafted history (item 8, and item 17's forged line)


def sha(index: int) -> str:
    return f"{index:064x}"


def merged_from(parents: list[str], name: str) -> dict:
    ranks = ("primary_model_hash", "secondary_model_hash", "tertiary_model_hash")
    recipe = {"type": "webui", "interp_method": "Weighted sum", "multiplier": 0.5}
    return {"name": name, "sd_merge_recipe": {**recipe, **dict(zip(ranks, parents, strict=False))}}


def model_with_history(path: Path, models: dict[str, dict], parents: list[str]) -> Path:
    recipe = merged_from(parents, "")["sd_merge_recipe"]
    metadata = {"sd_merge_recipe": json.dumps(recipe), "sd_merge_models": json.dumps(models)}
    save_file({"x": torch.zeros(1)}, path, metadata=metadata)
    return path


def test_lineage_shows_a_repeated_ancestor_once(tmp_path):
    """Each generation merges the one before with itself three times: 3^8 paths,
    9 models."""
    generations = 8
    history = {sha(i): merged_from([sha(i + 1)] * 3, f"gen{i}") for i in range(generations)}
    history[sha(generations)] = {"name": "first.ckpt", "sd_merge_recipe": None}
    model = model_with_history(tmp_path / "m.safetensors", history, [sha(0)] * 3)
    text = invoke("lineage", str(model))
    assert text.exit_code == 0
    lines = text.stdout.splitlines()
    assert len(lines) == 1 + 3 * (generations + 1)
    for index in range(generations):
        assert sum(f"gen{index}  [" in line for line in lines) == 3
        assert sum(f"gen{index}  [" in line and "shown above" in line for line in lines) == 2
    tree = json.loads(invoke("lineage", str(model), "--json").stdout)
    first, second, third = tree["inputs"]
    assert third == second
    assert first["name"] == "gen0" and len(first["inputs"]) == 3
    assert second["shown_above"] and second["inputs"] == [] and second["sha256"] == sha(0)
    mermaid = invoke("lineage", str(model), "--format", "mermaid").stdout
    assert mermaid.count('["') == generations + 2, "one box per model"
    assert mermaid.count(" --> ") == 3 * (generations + 1)


def test_lineage_stops_at_its_limits_and_says_so(tmp_path):
    chain = {sha(i): merged_from([sha(i + 1)], f"gen{i}") for i in range(100)}
    deep = model_with_history(tmp_path / "deep.safetensors", chain, [sha(0)])
    lines = invoke("lineage", str(deep)).stdout.splitlines()
    assert len(lines) == 65
    assert lines[-1].endswith("(ancestors not shown: more than 64 generations)")
    wide = {sha(i): merged_from([sha(3 * i + k) for k in (1, 2, 3)], f"m{i}") for i in range(3000)}
    broad = model_with_history(tmp_path / "wide.safetensors", wide, [sha(0)])
    result = invoke("lineage", str(broad), "--json")
    assert result.exit_code == 0
    assert result.stdout.count('"cut": "more than 1000 ancestors"') > 0
    assert result.stdout.count('"name": "m') <= 4 * 1000


def test_a_control_character_in_a_name_cannot_forge_a_tree_line(tmp_path):
    forged = "innocent\r├── forged.safetensors  [0123456789]\n└── also forged\x1b[2K"
    history = {sha(1): merged_from([sha(2)], forged), sha(2): merged_from([], "root.ckpt")}
    model = model_with_history(tmp_path / "m.safetensors", history, [sha(1)])
    for form in ((), ("--format", "mermaid")):
        out = invoke("lineage", str(model), *form).stdout
        assert len(out.splitlines()) == (3 if not form else 6)
        assert "\r" not in out and "\x1b" not in out
        assert "innocent\\r├── forged.safetensors  [0123456789]\\n└── also forged\\x1b[2K" in out
    tree = json.loads(invoke("lineage", str(model), "--json").stdout)
    assert tree["inputs"][0]["name"] == forged


def test_lineage_json_flag_is_format_json(tmp_path, models):
    flag = invoke("lineage", str(models["base"]), "--json")
    assert flag.exit_code == 0
    assert flag.stdout == invoke("lineage", str(models["base"]), "--format", "json").stdout
    both = invoke("lineage", str(models["base"]), "--json", "--format", "mermaid")
    assert both.exit_code == 2 and "--json and --format mermaid" in both.stderr


# --- what inspect and methods print (item 17)


def test_inspect_of_a_nan_alpha_adapter_does_not_print_nan_per_module(tmp_path):
    lora = write_adapter(
        tmp_path / "style.safetensors", AdapterSpec(shrink=SHRINK, alpha=float("nan"))
    )
    result = invoke("inspect", str(lora))
    assert (result.stdout + result.stderr).count("nan") <= 2
    assert result.exit_code == 2 and "alpha is nan" in result.stderr


def test_methods_json_names_parameter_types(tmp_path):
    listed = json.loads(invoke("methods", "--json").stdout)["methods"]
    types = {p["type"] for m in listed for p in m["parameters"].values()}
    assert {"float", "int", "bool"} <= types
    assert not any("<class" in kind for kind in types)
    weighted = next(m for m in listed if m["name"] == "weighted_sum")
    assert weighted["parameters"]["alpha"]["type"] == "float"


def test_diff_never_writes_a_heatmap_into_the_cache(tmp_path, models, monkeypatch):
    """The cache folder (--cache-dir, SDRECIPE_CACHE_DIR, default ./cache) is off
    limits to diff's heatmaps as to graph's views, forced or not."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SDRECIPE_CACHE_DIR", raising=False)
    (tmp_path / "cache").mkdir()
    (tmp_path / "mine").mkdir()
    pair = (str(models["base"]), str(models["finetune"]))
    cases = [
        (("--png", "cache/h.png"), {}),
        (("--svg", "mine/h.svg", "--cache-dir", "mine", "--force"), {}),
        (("--png", "mine/h.png", "--json"), {"SDRECIPE_CACHE_DIR": str(tmp_path / "mine")}),
    ]
    for options, env in cases:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        result = invoke("diff", *pair, *options)
        assert result.exit_code == 2, (options, result.output)
        assert "lies inside the cache folder" in result.stderr, result.stderr
        assert not (tmp_path / options[1]).exists()
    assert list((tmp_path / "cache").iterdir()) == list((tmp_path / "mine").iterdir()) == []
