"""NoobAI-XL / Illustrious v-prediction markers: the empty top-level `v_pred` and
`ztsnr` tensors (A1111 PR #16567) are kept from the base, never merged."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import SHRINK, as32, run_in_process, write_recipe
from sdrecipe.engine.builder import update_outputs
from sdrecipe.io.readers import open_model
from sdrecipe.plan.prepare import prepare
from sdrecipe.synthetic import ModelSpec, write_model

MARKERS = ("v_pred", "ztsnr")
NEVER_MERGED = {
    "never merged (v-prediction marker)": 1,
    "never merged (zero terminal SNR marker)": 1,
}
PREDICTION_TEXT = "prediction: v (v_pred marker), zero terminal SNR (ztsnr marker)"


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small SDXL models: a v-prediction base and fine-tune (both markers), a
    model with `v_pred` alone, and epsilon-prediction models without markers."""
    folder = tmp_path_factory.mktemp("vpred")
    specs = {
        "vbase": ModelSpec(family="sdxl", shrink=SHRINK, seed=1, markers=MARKERS),
        "vtune": ModelSpec(family="sdxl", shrink=SHRINK, seed=1, delta_seed=2, markers=MARKERS),
        "vonly": ModelSpec(family="sdxl", shrink=SHRINK, seed=6, markers=("v_pred",)),
        "eps": ModelSpec(family="sdxl", shrink=SHRINK, seed=1, delta_seed=3),
        "other": ModelSpec(family="sdxl", shrink=SHRINK, seed=4),
    }
    return {name: write_model(folder / f"{name}.safetensors", s) for name, s in specs.items()}


def header_entries(path: Path) -> dict[str, tuple[str, list[int], bytes]]:
    """Each tensor's dtype, shape and data bytes, as the file stores them."""
    with path.open("rb") as file:
        size = struct.unpack("<Q", file.read(8))[0]
        header = json.loads(file.read(size))
        data = file.read()
    header.pop("__metadata__", None)
    return {
        key: (entry["dtype"], entry["shape"], data[slice(*entry["data_offsets"])])
        for key, entry in header.items()
    }


def assert_markers_kept(out: Path, base: Path) -> None:
    ours, theirs = header_entries(out), header_entries(base)
    for key in MARKERS:
        assert ours[key] == theirs[key] == ("F32", [0], b""), key


def assert_merged_like(out: Path, base: Path, reference) -> None:
    """Every key of `base` in `out`: markers, integer keys and position ids as
    the base has them, every other tensor equal to `reference(key)`."""
    result, a = load_file(out), load_file(base)
    assert set(result) == set(a)
    for key, value in a.items():
        if key in MARKERS or value.dtype.kind == "i" or key.endswith("position_ids"):
            np.testing.assert_array_equal(result[key], value, err_msg=key)
            assert result[key].dtype == value.dtype, key
        else:
            np.testing.assert_allclose(result[key], reference(key), rtol=1e-6, atol=1e-7)


def test_weighted_sum_and_add_difference_keep_the_base_markers_byte_for_byte(tmp_path, sdxl):
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs:
          V: {sdxl["vbase"]}
          W: {sdxl["vtune"]}
          B: {sdxl["eps"]}
          C: {sdxl["other"]}
        nodes:
          blend: weighted_sum(V, W, alpha=0.3)
          blend16: weighted_sum(V, W, alpha=0.3)
          transfer: V + (W - C)
          eps_delta: V + (B - C)
        outputs:
          blend: {{path: blend.safetensors, dtype: fp32}}
          blend16: {{path: blend16.safetensors, dtype: bf16}}
          transfer: {{path: transfer.safetensors, dtype: fp32}}
          eps_delta: {{path: eps_delta.safetensors, dtype: fp32}}
        """,
    )
    summary = update_outputs(prepare(recipe), threads=2)
    v, w, b, c = (load_file(sdxl[n]) for n in ("vbase", "vtune", "eps", "other"))
    alpha = np.float32(0.3)
    assert_merged_like(
        tmp_path / "blend.safetensors",
        sdxl["vbase"],
        lambda k: (1 - alpha) * as32(v[k]) + alpha * as32(w[k]),
    )
    assert_merged_like(
        tmp_path / "transfer.safetensors",
        sdxl["vbase"],
        lambda k: as32(v[k]) + (as32(w[k]) - as32(c[k])),
    )
    assert_merged_like(
        tmp_path / "eps_delta.safetensors",
        sdxl["vbase"],
        lambda k: as32(v[k]) + (as32(b[k]) - as32(c[k])),
    )
    for name in ("blend", "blend16", "transfer", "eps_delta"):
        assert_markers_kept(tmp_path / f"{name}.safetensors", sdxl["vbase"])
    # A converted output converts weights only: the markers keep their dtype.
    dtypes = {entry[0] for entry in header_entries(tmp_path / "blend16.safetensors").values()}
    assert dtypes == {"BF16", "F32", "I64"}
    assert not summary.warnings
    for result in summary.outputs:
        assert result.dropped == 0
        for reason, count in NEVER_MERGED.items():
            assert result.passed_through[reason] == count, (result.name, reason)


def test_the_build_report_says_the_markers_are_never_merged(tmp_path, sdxl):
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{V: {sdxl["vbase"]}, B: {sdxl["eps"]}}}
        nodes: {{out: "weighted_sum(V, B, alpha=0.5)"}}
        outputs: {{out: out.safetensors}}
        """,
    )
    result = run_in_process("build", str(recipe))
    assert result.returncode == 0, result.stderr
    assert "1 never merged (v-prediction marker)" in result.stdout
    assert "1 never merged (zero terminal SNR marker)" in result.stdout
    assert "missing from" not in result.stdout
    metadata = open_model(tmp_path / "out.safetensors").metadata
    assert metadata["modelspec.prediction_type"] == "v"


def inspect_json(path: Path) -> dict:
    result = run_in_process("inspect", "--no-cache", "--json", str(path))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_inspect_reports_v_prediction_and_zero_terminal_snr(sdxl):
    text = run_in_process("inspect", "--no-cache", str(sdxl["vbase"]))
    assert text.returncode == 0, text.stderr
    assert PREDICTION_TEXT in text.stdout
    report = inspect_json(sdxl["vbase"])
    assert report["prediction_type"] == "v"
    assert report["zero_terminal_snr"] is True
    assert report["prediction"] == PREDICTION_TEXT.removeprefix("prediction: ")
    assert report["prediction_markers"] == ["v_pred", "ztsnr"]

    only = inspect_json(sdxl["vonly"])
    assert (only["prediction"], only["zero_terminal_snr"]) == ("v (v_pred marker)", False)
    plain = run_in_process("inspect", "--no-cache", str(sdxl["eps"]))
    assert "prediction" not in plain.stdout
    eps = inspect_json(sdxl["eps"])
    assert eps["prediction_type"] is None and eps["prediction"] is None
    assert eps["prediction_markers"] == []


def test_a_base_without_markers_gives_an_output_without_them_and_a_warning(tmp_path, sdxl):
    recipe = write_recipe(
        tmp_path,
        f"""
        inputs: {{B: {sdxl["eps"]}, V: {sdxl["vbase"]}, C: {sdxl["other"]}}}
        nodes:
          blend: weighted_sum(B, V, alpha=0.5)
          transfer: B + (V - C)
        outputs: {{blend: blend.safetensors, transfer: transfer.safetensors}}
        """,
    )
    validated = run_in_process("validate", str(recipe))
    assert validated.returncode == 0, validated.stderr
    summary = update_outputs(prepare(recipe), threads=2)
    assert len(summary.warnings) == 2
    for name, warning in zip(("blend", "transfer"), summary.warnings, strict=True):
        assert warning.startswith(f"output {name!r}: V carries v_pred (v-prediction marker)")
        assert "its base B does not" in warning and "Put V first" in warning
        assert warning in validated.stderr
    for result in summary.outputs:
        assert result.dropped == 2
        assert not set(MARKERS) & set(header_entries(tmp_path / f"{result.name}.safetensors"))
    report = inspect_json(tmp_path / "blend.safetensors")
    assert report["prediction_type"] is None


def convert(source: Path, target: Path, output_format: str) -> None:
    recipe = write_recipe(
        target.parent,
        f"""
        inputs: {{A: {source}}}
        nodes: {{model: A}}
        outputs: {{model: {{path: {target}, format: {output_format}}}}}
        """,
        name=f"{target.name}.yaml",
    )
    update_outputs(prepare(recipe), threads=2)


DIFFUSERS_CASES = [
    ("vbase", {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}, MARKERS),
    ("vonly", {"prediction_type": "v_prediction"}, ("v_pred",)),
    ("eps", {"prediction_type": "epsilon"}, ()),
]


def test_diffusers_scheduler_says_it_and_reads_back_as_markers(tmp_path, sdxl):
    stated = ("prediction_type", "rescale_betas_zero_snr")
    for model, scheduler, markers in DIFFUSERS_CASES:
        folder = tmp_path / model
        convert(sdxl[model], folder, "diffusers")
        config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        assert {key: value for key, value in config.items() if key in stated} == scheduler
        infos = open_model(folder).infos()
        assert [key for key in MARKERS if key in infos] == list(markers), model
        back = tmp_path / f"{model}-back.safetensors"
        convert(folder, back, "safetensors")
        entries = header_entries(back)
        assert {key: entries[key] for key in MARKERS if key in entries} == {
            key: ("F32", [0], b"") for key in markers
        }, model


def test_the_synthetic_generator_refuses_an_unknown_marker():
    with pytest.raises(ValueError, match="not a prediction marker"):
        write_model(Path("unused.safetensors"), ModelSpec(family="sdxl", markers=("vpred",)))
