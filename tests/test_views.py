"""Views for people: `graph`, `diff`, `lineage` and `init` (flags and a real
pseudo-terminal)."""

from __future__ import annotations

import hashlib
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file

from conftest import SHRINK, as32, invoke, write_recipe
from sdrecipe.arch import component_of
from sdrecipe.synthetic import ModelSpec, write_model

SVG = "{http://www.w3.org/2000/svg}"


def two_step_recipe(folder: Path, models: dict[str, Path]) -> Path:
    return write_recipe(
        folder,
        f"""
        inputs:
          A: {models["inpainting"]}
          B: {models["finetune"]}
          C: {models["base"]}
        nodes:
          learned: B - C
          inpaint: A + 0.5 * learned
        outputs:
          inpaint: out.safetensors
        """,
    )


def svg_texts(path: Path) -> list[str]:
    return [element.text or "" for element in ET.parse(path).getroot().iter(f"{SVG}text")]


# --- graph


def test_graph_mermaid_dot_and_json_show_the_dag_and_each_status(tmp_path, models):
    recipe = two_step_recipe(tmp_path, models)
    mermaid = invoke("graph", str(recipe))
    assert mermaid.exit_code == 0, mermaid.stderr
    text = mermaid.stdout
    assert text.startswith("flowchart LR\n")
    assert text.count(" --> ") == 5, "A, B, C and learned into nodes, inpaint into its output"
    assert '["inpaint<br/>A + 0.5 * learned<br/>rebuild: first build (no lock file)"]' in text
    assert '[("A<br/>inpainting.safetensors")]' in text
    dot = invoke("graph", str(recipe), "--format", "dot").stdout
    assert dot.startswith("digraph recipe {") and dot.count(" -> ") == 5
    assert '"node:learned" -> "node:inpaint";' in dot
    assert invoke("build", str(recipe)).exit_code == 0
    view = json.loads(invoke("graph", str(recipe), "--format", "json").stdout)
    states = {vertex["id"]: vertex["status"] for vertex in view["vertices"]}
    assert states["node:inpaint"] == "up to date" and states["output:inpaint"] == "up to date"
    assert states["input:A"] == "input"
    assert ["node:learned", "node:inpaint"] in view["edges"]
    assert "class v4 up_to_date" in invoke("graph", str(recipe)).stdout


def test_graph_pictures_are_valid_images_with_the_labels(tmp_path, models):
    recipe = two_step_recipe(tmp_path, models)
    assert invoke("graph", str(recipe), "-o", str(tmp_path / "g.svg")).exit_code == 0
    root = ET.parse(tmp_path / "g.svg").getroot()
    width, height = int(root.get("width")), int(root.get("height"))
    texts = svg_texts(tmp_path / "g.svg")
    for label in ("learned", "inpaint", "B - C", "A + 0.5 * learned", "out.safetensors"):
        assert label in texts
    assert "rebuild" in texts and "up to date" in texts, "the legend"
    assert (
        invoke("graph", str(recipe), "--format", "png", "-o", str(tmp_path / "g.png")).exit_code
        == 0
    )
    with Image.open(tmp_path / "g.png") as image:
        assert image.format == "PNG" and image.size == (width, height)
        colours = {colour for _, colour in image.getcolors(maxcolors=1_000_000)}
    assert (255, 204, 128) in colours, "rebuild boxes are filled orange"


def test_graph_without_inputs_draws_with_unknown_status(tmp_path):
    recipe = write_recipe(
        tmp_path,
        "inputs: {A: a.safetensors, B: b.safetensors}\nnodes: {m: A + B}\n"
        "outputs: {m: o.safetensors}\n",
    )
    result = invoke("graph", str(recipe), "--format", "json")
    assert result.exit_code == 0
    assert "status unknown" in result.stderr and "does not exist" in result.stderr
    states = {v["id"]: v["status"] for v in json.loads(result.stdout)["vertices"]}
    assert states["node:m"] == "unknown"


def test_a_view_never_replaces_a_file_not_named_for_it(tmp_path, models):
    recipe = two_step_recipe(tmp_path, models)
    before = recipe.read_bytes()
    result = invoke("graph", str(recipe), "--format", "svg", "-o", str(recipe))
    assert result.exit_code == 2 and "written to a .svg file" in result.stderr
    assert recipe.read_bytes() == before
    missing = invoke("graph", str(recipe), "--format", "png")
    assert missing.exit_code == 2 and "needs --output" in missing.stderr


# --- diff


def numpy_measures(reference: dict, model: dict, keys: list[str]) -> dict[str, float]:
    a2 = b2 = ab = d2 = 0.0
    largest = 0.0
    for key in keys:
        a, b = reference[key].astype(np.float64), model[key].astype(np.float64)
        a2, b2, ab = a2 + (a * a).sum(), b2 + (b * b).sum(), ab + (a * b).sum()
        d2 += ((b - a) ** 2).sum()
        largest = max(largest, float(np.abs(b - a).max()))
    return {"relative_l2": np.sqrt(d2 / a2), "cosine": ab / np.sqrt(a2 * b2), "max_abs": largest}


# Which SD1 keys make each block, written out here (supermerger's convention, see
# ../shared/reference/FACTS.md) rather than taken from the code under test.
UNET = "model.diffusion_model."
SD1_BLOCK_PREFIXES = {
    "BASE": ("cond_stage_model.", "first_stage_model."),
    "IN00": (f"{UNET}input_blocks.0.", f"{UNET}time_embed."),
    "IN04": (f"{UNET}input_blocks.4.",),
    "M00": (f"{UNET}middle_block.",),
    "OUT11": (f"{UNET}output_blocks.11.", f"{UNET}out."),
}


def test_diff_measures_per_block_and_component_equal_numpy(tmp_path, models, arrays):
    result = invoke(
        "diff", str(models["base"]), str(models["finetune"]), str(models["other"]), "--json"
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["family"] == "sd1" and len(report["models"]) == 2
    base = arrays["base"]
    floating = [key for key, value in base.items() if value.dtype.kind == "f"]
    for entry, name in zip(report["models"], ("finetune", "other"), strict=True):
        for block, prefixes in SD1_BLOCK_PREFIXES.items():
            keys = [key for key in floating if key.startswith(prefixes)]
            assert keys, block
            expected = numpy_measures(base, arrays[name], keys)
            got = entry["blocks"][block]
            assert got["keys"] == len(keys)
            for measure, value in expected.items():
                assert got[measure] == pytest.approx(value, rel=1e-9), (name, block, measure)
        keys = [key for key in floating if component_of(key) == "vae"]
        expected = numpy_measures(base, arrays[name], keys)
        assert entry["components"]["vae"]["relative_l2"] == pytest.approx(expected["relative_l2"])
    assert list(report["models"][0]["blocks"])[:3] == ["BASE", "IN00", "IN01"]


def test_diff_lists_keys_only_in_one_model_and_other_shapes(tmp_path, models):
    tensors = load_torch(models["finetune"])
    removed = "model.diffusion_model.out.2.bias"
    del tensors[removed]
    tensors["extra.weight"] = torch.zeros(3)
    save_file(tensors, tmp_path / "changed.safetensors")
    result = invoke(
        "diff",
        str(models["base"]),
        str(tmp_path / "changed.safetensors"),
        str(models["inpainting"]),
        "--json",
        "--by",
        "key",
    )
    report = json.loads(result.stdout)
    changed, inpainting = report["models"]
    assert changed["only_in_reference"] == [removed]
    assert changed["only_in_model"] == ["extra.weight"]
    assert "model.diffusion_model.out.2.weight" in changed["keys"]
    assert inpainting["shape_differs"] == ["model.diffusion_model.input_blocks.0.0.weight"]
    text = invoke(
        "diff", str(models["base"]), str(tmp_path / "changed.safetensors"), "--by", "component"
    )
    assert "keys only in base.safetensors: 1, only in changed.safetensors: 1" in text.stdout
    assert "  unet " in text.stdout


def test_diff_heatmap_has_a_row_per_model_and_a_column_per_block(tmp_path, models):
    models_b = [str(models[name]) for name in ("finetune", "other", "base")]
    svg, png = tmp_path / "h.svg", tmp_path / "h.png"
    result = invoke("diff", str(models["base"]), *models_b, "--svg", str(svg), "--png", str(png))
    assert result.exit_code == 0, result.stderr
    texts = svg_texts(svg)
    for label in ("BASE", "IN00", "M00", "OUT11", "finetune.safetensors", "other.safetensors"):
        assert label in texts
    assert texts.count("0") == 27, "the base against itself in 26 cells, and the legend's low end"
    root = ET.parse(svg).getroot()
    with Image.open(png) as image:
        assert image.size == (int(root.get("width")), int(root.get("height")))
        assert image.size[0] > 26 * 50


# --- lineage


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_lineage_follows_generations_of_merges(tmp_path, models):
    first = two_step_recipe(tmp_path, models)
    assert invoke("build", str(first)).exit_code == 0
    second = write_recipe(
        tmp_path,
        f"""
        inputs: {{X: {tmp_path / "out.safetensors"}, Y: {models["other"]}}}
        nodes: {{blend: "weighted_sum(X, Y, alpha=0.25)"}}
        outputs: {{blend: second.safetensors}}
        """,
        "second.yaml",
    )
    assert invoke("build", str(second)).exit_code == 0
    result = invoke("lineage", str(tmp_path / "second.safetensors"), "--format", "json")
    tree = json.loads(result.stdout)
    assert tree["autov2"] == sha256(tmp_path / "second.safetensors")[:10]
    assert tree["operation"].startswith("blend = weighted_sum(X, Y, alpha=0.25)")
    x, y = tree["inputs"]
    assert x["name"] == "X: out.safetensors" and x["sha256"] == sha256(tmp_path / "out.safetensors")
    assert x["operation"].startswith("A + 0.5 * learned")
    assert [i["name"] for i in x["inputs"]] == [
        "inpainting.safetensors",
        "finetune.safetensors",
        "base.safetensors",
    ]
    assert y["inputs"] == [] and y["autov2"] == sha256(models["other"])[:10]
    text = invoke("lineage", str(tmp_path / "second.safetensors")).stdout
    assert "├── X: out.safetensors" in text and "│   └── base.safetensors" in text
    mermaid = invoke("lineage", str(tmp_path / "second.safetensors"), "--format", "mermaid").stdout
    assert mermaid.startswith("flowchart BT") and mermaid.count(" --> ") == 5


def test_lineage_reads_a1111_merges_recursively(tmp_path, models):
    parent, grandparent = "a" * 64, "b" * 64
    lineage = {
        parent: {
            "name": "parent.safetensors",
            "legacy_hash": "00000000",
            "sd_merge_recipe": {
                "type": "webui",
                "interp_method": "Add difference",
                "multiplier": 0.7,
                "primary_model_hash": grandparent,
            },
        },
        grandparent: {"name": "grand.ckpt", "legacy_hash": "1", "sd_merge_recipe": None},
    }
    recipe = {
        "type": "webui",
        "interp_method": "Weighted sum",
        "multiplier": 0.3,
        "primary_model_hash": parent,
        "secondary_model_hash": None,
    }
    save_file(
        {"x": torch.zeros(1)},
        tmp_path / "webui.safetensors",
        metadata={"sd_merge_recipe": json.dumps(recipe), "sd_merge_models": json.dumps(lineage)},
    )
    tree = json.loads(
        invoke("lineage", str(tmp_path / "webui.safetensors"), "--format", "json").stdout
    )
    assert tree["operation"] == "Weighted sum, multiplier 0.3 (webui)"
    (only,) = tree["inputs"]
    assert only["name"] == "parent.safetensors" and only["operation"].startswith("Add difference")
    assert only["inputs"][0]["name"] == "grand.ckpt" and only["inputs"][0]["autov2"] == "b" * 10


# --- init


def test_init_with_flags_writes_a_valid_commented_recipe(tmp_path, models):
    out = tmp_path / "recipes" / "mine.yaml"
    result = invoke(
        "init",
        "--template",
        "inpaint",
        "--inpainting",
        str(models["inpainting"]),
        "--finetune",
        str(models["finetune"]),
        "--base",
        str(models["base"]),
        "--out",
        str(out),
        "--output-model",
        str(tmp_path / "build" / "mine.safetensors"),
        "--dtype",
        "float16",
    )
    assert result.exit_code == 0, result.stderr
    assert "A = inpainting.safetensors: sd1 inpainting" in result.stdout
    assert "valid" in result.stdout
    text = out.read_text()
    assert text.startswith("# inpainting transplant")
    assert 'merged: "A + (B - C)"' in text and "dtype: float16" in text
    assert "path: ../build/mine.safetensors" in text
    assert invoke("build", str(out)).exit_code == 0
    again = invoke(
        "init",
        "--template",
        "weighted",
        "--base",
        str(models["base"]),
        "--other",
        str(models["finetune"]),
        "--out",
        str(out),
    )
    assert again.exit_code == 2 and "exists" in again.stderr
    assert out.read_text() == text


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sdxl")
    return write_model(folder / "xl.safetensors", ModelSpec("sdxl", shrink=SHRINK, seed=1))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            ("--inpainting", "finetune", "--finetune", "inpainting", "--base", "base"),
            "B (--finetune) is an inpainting model; the inpainting model must be the base",
        ),
        (
            ("--inpainting", "base", "--finetune", "finetune", "--base", "base"),
            "A (--inpainting) is sd1 normal, not an inpainting model",
        ),
        (
            ("--inpainting", "inpainting", "--finetune", "sdxl", "--base", "base"),
            "different families (A is sd1, B is sdxl, C is sd1)",
        ),
    ],
)
def test_init_refuses_combinations_that_cannot_work(
    tmp_path, models, sdxl_model, arguments, message
):
    paths = {**models, "sdxl": sdxl_model}
    resolved = [str(paths.get(argument, argument)) for argument in arguments]
    out = tmp_path / "x.yaml"
    result = invoke("init", "--template", "inpaint", *resolved, "--out", str(out))
    assert result.exit_code == 2 and message in result.stderr
    assert not out.exists()


def test_init_without_a_terminal_names_the_missing_flag(tmp_path, models):
    result = invoke("init", "--template", "weighted", "--base", str(models["base"]))
    assert result.exit_code == 2 and "missing --other" in result.stderr


def test_init_asks_through_a_real_terminal(tmp_path, models):
    pexpect = pytest.importorskip("pexpect")
    terminal = pexpect.spawn(
        sys.executable,
        ["-m", "sdrecipe", "init"],
        cwd=str(tmp_path),
        encoding="utf-8",
        timeout=60,
        dimensions=(40, 120),
    )
    terminal.expect("What do you want to make")
    terminal.expect(r"Template .*: ")
    terminal.sendline("weighted")
    terminal.expect("The first model: ")
    terminal.sendline(str(tmp_path / "nowhere.safetensors"))
    terminal.expect("does not exist")
    terminal.sendline(str(models["base"]))
    terminal.expect("A = base.safetensors: sd1 normal")
    terminal.expect("The second model: ")
    terminal.sendline(str(models["finetune"]))
    terminal.expect(r"alpha, the weight of the second model \(0..1\) \[0.5\]: ")
    terminal.sendline("0.3")
    terminal.expect(r"Write the recipe to \[recipes/weighted.yaml\]: ")
    terminal.sendline("")
    terminal.expect(r"Write the merged model to \[build/weighted.safetensors\]: ")
    terminal.sendline("")
    terminal.expect("valid")
    terminal.expect(pexpect.EOF)
    terminal.close()
    assert terminal.exitstatus == 0
    recipe = (tmp_path / "recipes" / "weighted.yaml").read_text()
    assert 'merged: "weighted_sum(A, B, alpha=0.3)"' in recipe
    assert "path: ../build/weighted.safetensors" in recipe
    assert invoke("build", str(tmp_path / "recipes" / "weighted.yaml")).exit_code == 0
    out = load_file(tmp_path / "build" / "weighted.safetensors")
    key = "model.diffusion_model.out.2.weight"
    base, finetune = load_file(models["base"])[key], load_file(models["finetune"])[key]
    expected = 0.7 * as32(base) + 0.3 * as32(finetune)
    np.testing.assert_allclose(as32(out[key]), expected, rtol=1e-3, atol=1e-4)


def test_diff_refuses_an_adapter_for_a_model(tmp_path, models):
    from sdrecipe.synthetic import AdapterSpec, write_adapter

    lora = write_adapter(tmp_path / "style.safetensors", AdapterSpec(shrink=SHRINK))
    result = invoke("diff", str(models["base"]), str(lora))
    assert result.exit_code == 2 and "is a LoRA / LyCORIS file, not a model" in result.stderr
