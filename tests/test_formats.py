"""Model formats and model knowledge: .ckpt inputs, architecture detection, inspect."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import SHRINK, invoke, run_in_process, write_recipe
from sdrecipe.arch.detect import detect
from sdrecipe.synthetic import ModelSpec, model_layout

FAMILIES = ("sd1", "sd2", "sdxl", "sdxl-refiner")
VARIANTS = ("normal", "inpainting", "instruct-pix2pix")


def to_checkpoint(source, target, legacy_names=False, old_format=False):
    """Save a safetensors model as a pickled {"state_dict": ...} checkpoint."""
    tensors = load_file(source)
    if legacy_names:
        tensors = {
            key.replace(
                "cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."
            ): value
            for key, value in tensors.items()
        }
    torch.save(
        {"state_dict": tensors, "global_step": 1000},
        target,
        _use_new_zipfile_serialization=not old_format,
    )
    return target


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_detection_from_keys_and_shapes(family, variant):
    infos = model_layout(ModelSpec(family=family, variant=variant, shrink=SHRINK))
    found = detect(infos, {})
    assert (found.family, found.variant, found.ema) == (family, variant, False)
    unet_only = {k: v for k, v in infos.items() if k.startswith("model.diffusion_model.")}
    assert (detect(unet_only, {}).family, detect(unet_only, {}).variant) == (family, variant)


def test_unknown_layout_reports_its_prefixes():
    found = detect(
        {
            "lora_unet_down.weight": model_layout(ModelSpec(shrink=SHRINK))[
                "model.diffusion_model.out.2.bias"
            ]
        },
        {},
    )
    assert found.family == "unknown"
    assert found.describe() == "unknown (keys under: lora_unet_down.weight.)"


@pytest.mark.parametrize(
    ("options", "label"),
    [({}, "zip"), ({"old_format": True}, "pre-zip"), ({"legacy_names": True}, "legacy names")],
)
def test_checkpoint_inputs_merge_like_safetensors(tmp_path, models, options, label):
    checkpoint = to_checkpoint(models["finetune"], tmp_path / "finetune.ckpt", **options)
    results = {}
    for name, b_path in (("safetensors", models["finetune"]), ("ckpt", checkpoint)):
        recipe = write_recipe(
            tmp_path,
            f"""
            inputs: {{A: {models["inpainting"]}, B: {b_path}, C: {models["base"]}}}
            nodes: {{out: A + (B - C)}}
            outputs: {{out: {name}.safetensors}}
            """,
            name=f"{name}.yaml",
        )
        result = run_in_process("build", "--no-cache", str(recipe))
        assert result.returncode == 0, result.stderr
        results[name] = load_file(tmp_path / f"{name}.safetensors")
    assert results["ckpt"].keys() == results["safetensors"].keys()
    for key, value in results["safetensors"].items():
        assert torch.equal(results["ckpt"][key], value), key


def test_a_ckpt_that_is_no_pickle_is_a_one_line_error(tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("hello world, not a pickle\n")
    result = invoke("inspect", str(text))
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {text}: cannot read the checkpoint: not a PyTorch checkpoint (KeyError: 101)\n"
    )


def test_malicious_pickle_is_refused_and_never_run(tmp_path, models):
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": Payload()}, evil)
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {models["base"]}, B: {evil}}}
        nodes: {{out: "weighted_sum(A, B)"}}
        outputs: {{out: out.safetensors}}
        """,
    )
    for command in ("validate", "build"):
        result = run_in_process(command, str(recipe))
        assert result.returncode == 2
        assert "refused to load" in result.stderr and "evil.ckpt" in result.stderr
        assert "recipe.yaml:1: input 'B'" in result.stderr
        assert "Traceback" not in result.stderr
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_merging_different_architectures_is_refused_unless_forced(tmp_path, models):
    # B is detected as SD2 but keeps only the tensors shaped as in SD1 (the VAE,
    # most of the UNet), so a forced per-key merge is well defined.
    sd1 = load_file(models["other"])
    sd2_layout = model_layout(ModelSpec(family="sd2", shrink=SHRINK))
    marker = "cond_stage_model.model.ln_final.weight"
    kept = {k: v for k, v in sd1.items() if k in sd2_layout and sd2_layout[k].shape == v.shape}
    kept[marker] = torch.ones(sd2_layout[marker].shape, dtype=torch.float16)
    save_file(kept, tmp_path / "sd2ish.safetensors")
    text = f"""
        inputs: {{A: {models["base"]}, B: {tmp_path / "sd2ish.safetensors"}}}
        nodes:
          out: {{expression: "weighted_sum(A, B, alpha=0.5)"FORCE}}
        outputs: {{out: out.safetensors}}
        """
    refused = write_recipe(tmp_path, text.replace("FORCE", ""), name="refused.yaml")
    result = run_in_process("validate", str(refused))
    assert result.returncode == 2
    assert "refused.yaml:3: node 'out' mixes architectures (A is sd1, B is sd2)" in result.stderr
    forced = write_recipe(tmp_path, text.replace("FORCE", ", force: true"), name="forced.yaml")
    assert run_in_process("validate", str(forced)).returncode == 0
    built = run_in_process("build", "--force", "--no-cache", "--json", str(refused))
    assert built.returncode == 0, built.stderr
    (output,) = json.loads(built.stdout)["outputs"]
    shared = len(kept) - 1  # every kept tensor but the SD2 marker is in A
    assert output["merged"] == shared
    assert output["passed_through"] == {
        "missing from B": len(sd1) - shared - 1,
        "never merged (CLIP position ids)": 1,
    }


def test_inspect_reports_format_architecture_components_and_lineage(tmp_path, models):
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{A: {models["inpainting"]}, B: {models["finetune"]}, C: {models["base"]}}}
        nodes: {{inpaint: A + (B - C)}}
        outputs: {{inpaint: out.safetensors}}
        """,
    )
    assert run_in_process("build", str(recipe)).returncode == 0
    result = run_in_process("inspect", "--json", str(tmp_path / "out.safetensors"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["format"], report["family"], report["variant"]) == (
        "safetensors",
        "sd1",
        "inpainting",
    )
    assert set(report["components"]) == {"unet", "vae", "text_encoder"}
    assert report["components"]["unet"]["keys"] == 686
    assert report["dtypes"] == {"F16": 1130, "I64": 1}
    assert report["autov2"] == report["sha256"][:10] and len(report["legacy_hash"]) == 8
    assert report["lineage"]["sdrecipe"]["expression"] == "A + (B - C)"
    assert set(report["lineage"]["sd_merge_models"].values()) == {
        "inpainting.safetensors",
        "finetune.safetensors",
        "base.safetensors",
    }
    checkpoint = to_checkpoint(models["base"], tmp_path / "base.ckpt")
    as_ckpt = json.loads(run_in_process("inspect", "--json", str(checkpoint)).stdout)
    assert (as_ckpt["format"], as_ckpt["family"], as_ckpt["lineage"]) == ("checkpoint", "sd1", {})
