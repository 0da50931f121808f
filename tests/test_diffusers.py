"""Diffusers folders in and out, and baking a VAE into an output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file

from conftest import SHRINK, as32, convert, run_in_process, write_recipe
from sdrecipe.engine.builder import update_outputs
from sdrecipe.io.readers import open_model
from sdrecipe.plan.prepare import prepare
from sdrecipe.synthetic import ModelSpec, write_model

FAMILIES = ["sd1", "sd2", "sdxl", "sdxl-refiner"]
VAE_KEY = "first_stage_model.decoder.conv_in.weight"


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model in any format, under single-file names."""
    reader = open_model(path)
    return {key: reader.tensor(key).clone() for key in reader.infos()}


def not_kept_by_diffusers(family: str, key: str) -> bool:
    """Keys a diffusers folder cannot hold (see README): OpenCLIP's logit scale and
    SD2's last text-encoder layer, which SD2 never uses."""
    return key.endswith("logit_scale") or (family == "sd2" and ".resblocks.23." in key)


@pytest.fixture(scope="module")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("families")
    return {
        family: write_model(
            folder / f"{family}.safetensors", ModelSpec(family=family, shrink=SHRINK, seed=7)
        )
        for family in FAMILIES
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_to_diffusers_and_back_is_lossless(tmp_path, family_models, family):
    original = family_models[family]
    folder = convert(original, tmp_path / "model")
    back = convert(folder, tmp_path / "back.safetensors", "safetensors")
    source = load_file(original)
    result = load_file(back)
    kept = {key for key in source if not not_kept_by_diffusers(family, key)}
    assert set(result) == kept
    for key in kept:
        assert result[key].dtype == source[key].dtype, key
        assert result[key].shape == source[key].shape, key
        assert result[key].tobytes() == source[key].tobytes(), key
    assert open_model(folder).infos().keys() == kept
    reported = json.loads(run_in_process("inspect", str(folder), "--json").stdout)
    assert (reported["format"], reported["family"]) == ("diffusers", family)


def test_diffusers_folder_layout_and_configs_follow_the_shapes(tmp_path, models):
    folder = convert(models["inpainting"], tmp_path / "model")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInpaintPipeline"
    assert index["tokenizer"] == [None, None]  # no tokenizer to copy from a single file
    unet = json.loads((folder / "unet/config.json").read_text())
    assert unet["in_channels"] == 9
    assert unet["block_out_channels"] == [320 // SHRINK * m for m in (1, 2, 4, 4)]
    assert unet["down_block_types"][-1] == "DownBlock2D"
    assert unet["use_linear_projection"] is False
    text = json.loads((folder / "text_encoder/config.json").read_text())
    assert (text["num_hidden_layers"], text["hidden_act"]) == (12, "quick_gelu")
    stored = load_torch(folder / "vae/diffusion_pytorch_model.safetensors")
    assert stored["encoder.mid_block.attentions.0.to_q.weight"].dim() == 2
    assert "text_model.embeddings.position_ids" not in load_torch(
        folder / "text_encoder/model.safetensors"
    )


def test_ckpt_and_diffusers_inputs_merge_like_safetensors(tmp_path, models):
    names = {"A": "inpainting", "B": "finetune", "C": "base"}
    forms: dict[str, dict[str, Path]] = {"safetensors": {}, "ckpt": {}, "diffusers": {}}
    for letter, name in names.items():
        forms["safetensors"][letter] = models[name]
        ckpt = tmp_path / f"{name}.ckpt"
        torch.save({"state_dict": load_torch(models[name])}, ckpt)
        forms["ckpt"][letter] = ckpt
        forms["diffusers"][letter] = convert(models[name], tmp_path / f"{name}-diffusers")
    results = {}
    for form, paths in forms.items():
        recipe = write_recipe(
            tmp_path,
            f"""
            inputs:
              A: {paths["A"]}
              B: {paths["B"]}
              C: {paths["C"]}
            nodes:
              inpaint: A + (B - C)
            outputs:
              inpaint: {tmp_path / form}.safetensors
            """,
            name=f"{form}.yaml",
        )
        update_outputs(prepare(recipe), threads=2)
        results[form] = load_file(tmp_path / f"{form}.safetensors")
    for form in ("ckpt", "diffusers"):
        assert results[form].keys() == results["safetensors"].keys()
        for key, value in results["safetensors"].items():
            np.testing.assert_array_equal(results[form][key], value, err_msg=f"{form} {key}")


def test_reader_takes_bin_fp16_variants_shards_and_old_attention_names(tmp_path, models):
    folder = convert(models["base"], tmp_path / "model")
    expected = tensors_of(folder)
    unet = folder / "unet"
    weights = load_torch(unet / "diffusion_pytorch_model.safetensors")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    names = sorted(weights)
    halves = {1: names[: len(names) // 2], 2: names[len(names) // 2 :]}
    weight_map = {}
    for shard, keys in halves.items():
        file = f"diffusion_pytorch_model.fp16-0000{shard}-of-00002.safetensors"
        save_file({key: weights[key] for key in keys}, unet / file)
        weight_map.update(dict.fromkeys(keys, file))
    index = unet / "diffusion_pytorch_model.safetensors.index.fp16.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    text = folder / "text_encoder"
    torch.save(load_torch(text / "model.safetensors"), text / "pytorch_model.bin")
    (text / "model.safetensors").unlink()
    (text / "pytorch_model.bin").rename(text / "model.bin")
    vae = folder / "vae"
    old_names = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    stored = load_torch(vae / "diffusion_pytorch_model.safetensors")
    renamed = {}
    for key, value in stored.items():
        for new, old in old_names.items():
            if ".attentions.0." in key:
                key = key.replace(new, old)
        renamed[key] = value
    save_file(renamed, vae / "diffusion_pytorch_model.fp16.safetensors")
    (vae / "diffusion_pytorch_model.safetensors").unlink()
    found = tensors_of(folder)
    assert found.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(found[key], value), key
    index.write_text(json.dumps({"weight_map": {"x": "missing.safetensors"}}))
    result = run_in_process("inspect", str(folder))
    assert result.returncode == 2
    assert "missing.safetensors" in result.stderr and "Traceback" not in result.stderr


def test_diffusers_output_is_incremental_verifiable_and_copies_tokenizers(tmp_path, models):
    source = convert(models["base"], tmp_path / "source")
    (source / "tokenizer").mkdir()
    (source / "tokenizer" / "vocab.json").write_text('{"a": 0}\n')
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs:
          A: {source}
          B: {models["finetune"]}
        nodes:
          mix: weighted_sum(A, B, alpha=0.25)
        outputs:
          mix:
            path: out
            format: diffusers
        """,
    )
    first = run_in_process("build", str(recipe))
    assert first.returncode == 0, first.stderr
    out = tmp_path / "out"
    assert (out / "tokenizer" / "vocab.json").read_text() == '{"a": 0}\n'
    index = json.loads((out / "model_index.json").read_text())
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    a, b = tensors_of(source), tensors_of(models["finetune"])
    merged = tensors_of(out)
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    expected = as32(a[key].numpy()) * 0.75 + as32(b[key].numpy()) * 0.25
    np.testing.assert_allclose(as32(merged[key].numpy()), expected, rtol=1e-3, atol=1e-4)
    again = run_in_process("build", str(recipe), "--json")
    assert json.loads(again.stdout)["outputs"][0]["result"] == "up to date"
    verified = run_in_process("verify", str(recipe))
    assert verified.returncode == 0, verified.stderr
    (source / "tokenizer" / "vocab.json").write_text('{"b": 0}\n')
    rebuilt = run_in_process("build", str(recipe), "--json")
    assert json.loads(rebuilt.stdout)["outputs"][0]["result"] == "built"
    assert (out / "tokenizer" / "vocab.json").read_text() == '{"b": 0}\n'
    assert not list(tmp_path.glob(".out*"))  # no temporary folder left behind


def test_baked_vae_replaces_the_merged_one(tmp_path, models, arrays, standalone_vae):
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs:
          A: {models["base"]}
          B: {models["finetune"]}
        nodes:
          mix: weighted_sum(A, B, alpha=0.5)
        outputs:
          mix:
            path: out.safetensors
            vae: {standalone_vae.name}
        """,
    )
    result = run_in_process("build", str(recipe))
    assert result.returncode == 0, result.stderr
    out = load_file(tmp_path / "out.safetensors")
    vae = load_file(standalone_vae)
    for key in arrays["base"]:
        if key.startswith("first_stage_model."):
            expected = vae[key.removeprefix("first_stage_model.")].astype(np.float16)
            np.testing.assert_array_equal(out[key], expected, err_msg=key)
    key = "model.diffusion_model.out.2.weight"
    mixed = (as32(arrays["base"][key]) + as32(arrays["finetune"][key])) / 2
    np.testing.assert_allclose(as32(out[key]), mixed, rtol=1e-3, atol=1e-4)
    assert "loss.logvar" not in out and "first_stage_model.loss.logvar" not in out
    lock = (tmp_path / "recipe.lock").read_text()
    assert "mix.vae:" in lock and "vae-ft.safetensors" in lock
    header = open_model(tmp_path / "out.safetensors").metadata
    assert json.loads(header["sd_merge_recipe"])["bake_in_vae"] == "vae-ft.safetensors"
    embedded = write_recipe(tmp_path, header["sdrecipe.recipe"], "embedded.yaml")
    shutil.copy(tmp_path / "out.safetensors", tmp_path / "first.safetensors")
    (tmp_path / "out.safetensors").unlink()
    for name in ("base", "finetune"):
        shutil.copy(models[name], tmp_path / models[name].name)
    rebuilt = run_in_process("build", str(embedded))
    assert rebuilt.returncode == 0, rebuilt.stderr
    first = (tmp_path / "first.safetensors").read_bytes()
    assert (tmp_path / "out.safetensors").read_bytes() == first


def test_a_vae_that_does_not_fit_is_refused_by_key(tmp_path, models):
    wrong = {
        key.removeprefix("first_stage_model."): torch.zeros(3, 3)
        if key == VAE_KEY
        else torch.zeros(value.shape)
        for key, value in load_torch(models["other"]).items()
        if key.startswith("first_stage_model.")
    }
    save_file(wrong, tmp_path / "wrong-vae.safetensors")
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs:
          A: {models["base"]}
        nodes:
          same: A
        outputs:
          same:
            path: out.safetensors
            vae: wrong-vae.safetensors
        """,
    )
    result = run_in_process("build", str(recipe))
    assert result.returncode == 2
    assert VAE_KEY in result.stderr and "recipe.yaml:8" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out.safetensors").exists()
