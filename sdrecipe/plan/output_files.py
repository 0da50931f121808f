"""What each output file holds, decided from file headers: its base input's
tensors in the output dtype, a baked VAE in place of the base's, the tensors a
GGUF keeps, and the keys stored otherwise than as their dtype's values
(scaled fp8, GGUF blocks: see `sdrecipe.io.encodings`)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from sdrecipe.adapters.extract import extracted_keys
from sdrecipe.arch import EMA_PREFIX, component_of, vae_prefix
from sdrecipe.arch.family import families, known
from sdrecipe.errors import RecipeError
from sdrecipe.io.dtypes import NAME_TO_DTYPE
from sdrecipe.io.encodings import (
    FP8_MAX,
    SCALED_MARKER,
    Encoding,
    GgmlType,
    ScaledFp8,
    fp8_dtype,
    gguf_type,
    scale_key,
)
from sdrecipe.io.gguf_reader import gguf_prefix
from sdrecipe.io.tensor_info import TensorInfo
from sdrecipe.plan.graph import MergeGraph


class OutputFiles:
    """The tensors of each output of `graph`, as `tensors` decides them.

    Per output name: `written` holds its tensors, `baked` the keys it takes from
    its baked VAE, `encodings` the keys stored otherwise than as their dtype's
    values and `constants` the tensors whose bytes are fixed (the scaled-fp8
    marker); `notes` are warnings about what was left out."""

    def __init__(
        self,
        graph: MergeGraph,
        input_infos: dict[str, dict[str, TensorInfo]],
        families: Mapping[str, str],
    ):
        self.graph = graph
        self.input_infos = input_infos
        self.families = families
        self.baked: dict[str, frozenset[str]] = {}
        self.written: dict[str, dict[str, TensorInfo]] = {}
        self.encodings: dict[str, dict[str, Encoding]] = {}
        self.constants: dict[str, dict[str, torch.Tensor]] = {}
        self.notes: list[str] = []

    def tensors(self, name: str) -> dict[str, TensorInfo]:
        """The tensors output `name` will hold: its base input's, in the output
        dtype, with the VAE replaced by the baked one's when it has `vae`."""
        output = self.graph.recipe.outputs[name]
        target = NAME_TO_DTYPE[output.dtype] if output.dtype else None
        base_name = self.graph.base_input(output.node)
        base = self.input_infos[base_name]
        if output.lora is not None:  # the writer takes each layer's difference
            family = self.families.get(base_name, "unknown")
            keys = extracted_keys(family, list(base), output.lora)
            if not keys:
                named = [f.name for f in families() if f.adapters.patchable]
                raise RecipeError(
                    f"output {name!r}: no layer of {base_name} ({family}) has a LoRA module "
                    f"name, so a LoRA extracted from it would be empty; sdrecipe names LoRA "
                    f"modules for {', '.join(named)}",
                    self.graph.recipe.path,
                    output.line,
                )
            self.written[name] = {key: TensorInfo(torch.float32, base[key].shape) for key in keys}
            return self.written[name]
        found = dict(base)
        if output.vae is not None:
            prefix = vae_prefix(self.families.get(base_name, "unknown"))
            found = {key: info for key, info in found.items() if not key.startswith(prefix)}
            baked = self._baked_vae(name, base)
            self.baked[name] = frozenset(baked)
            found.update(baked)
        family = self.families.get(base_name, "unknown")
        if output.format == "gguf":
            found = self._gguf_tensors(name, family, found)
        tensors = {}
        for key, info in found.items():
            if output.prune_ema and key.startswith(EMA_PREFIX):
                continue
            # A tensor without elements (a prediction marker) has nothing to convert.
            convert = target is not None and info.is_floating and info.numel > 0
            dtype = target if convert else info.dtype
            if convert and target in FP8_MAX:
                dtype = fp8_dtype(key, info, family, target, output.scaled)  # type: ignore[arg-type]
            tensors[key] = TensorInfo(dtype, info.shape)
        if output.scaled:
            self._scaled_fp8(name, family, tensors)
        self.written[name] = tensors
        return tensors

    def _gguf_tensors(
        self, name: str, family: str, found: dict[str, TensorInfo]
    ) -> dict[str, TensorInfo]:
        """The tensors a GGUF output holds: the diffusion model's, in float32,
        each encoded as `gguf_type` says."""
        output = self.graph.recipe.outputs[name]
        data = known(family)
        if data is None or data.gguf is None:
            named = ", ".join(f.name for f in families() if f.gguf)
            raise RecipeError(
                f"output {name!r}: ComfyUI-GGUF has no architecture for {family} models, so a "
                f"GGUF of one would not load (GGUF outputs are written for {named})",
                self.graph.recipe.path,
                output.line,
            )
        kept = {
            key: TensorInfo(torch.float32, info.shape)
            for key, info in found.items()
            if component_of(key, family) == data.gguf.component and info.is_floating
        }
        if not kept:
            raise RecipeError(
                f"output {name!r}: the model has no {data.gguf.component} tensors to write",
                self.graph.recipe.path,
                output.line,
            )
        prefix = gguf_prefix(data)
        names: dict[str, str] = {}
        for key in kept:
            clash = names.setdefault(key.removeprefix(prefix), key)
            if clash != key:
                raise RecipeError(
                    f"output {name!r}: {clash} and {key} would both be named "
                    f"{key.removeprefix(prefix)} in the GGUF",
                    self.graph.recipe.path,
                    output.line,
                )
        left = len(found) - len(kept)
        if left:
            self.notes.append(
                f"output {name!r}: a GGUF holds the {data.gguf.component} alone (as "
                f"ComfyUI-GGUF loads it); {left} other tensor(s) are not written"
            )
        assert output.quant is not None
        self.encodings[name] = {
            key: GgmlType(gguf_type(info, output.quant)) for key, info in kept.items()
        }
        return kept

    def _scaled_fp8(self, name: str, family: str, tensors: dict[str, TensorInfo]) -> None:
        """A scale for each fp8 matrix, and the marker beside the model's keys."""
        output = self.graph.recipe.outputs[name]
        target = NAME_TO_DTYPE[output.dtype]  # type: ignore[index]
        scaled = {
            key: ScaledFp8(target, scale_key(key))
            for key, i in tensors.items()
            if i.dtype == target
        }
        taken = [e.scale_key for e in scaled.values() if e.scale_key in tensors]
        prefix = next(
            (p for p in _model_prefixes(family) if any(k.startswith(p) for k in tensors)), ""
        )
        marker = prefix + SCALED_MARKER
        if taken or marker in tensors:
            raise RecipeError(
                f"output {name!r}: the model already has a tensor named {(taken or [marker])[0]}, "
                "which a scaled-fp8 file uses for its scales",
                self.graph.recipe.path,
                output.line,
            )
        self.encodings[name] = dict(scaled)
        self.constants[name] = {marker: torch.empty(0, dtype=target)}

    def _baked_vae(self, name: str, base: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
        """The VAE tensors output `name` takes from its `vae` input (in the base's
        dtype where the base has the key), after checking they fit the base."""
        recipe = self.graph.recipe
        output = recipe.outputs[name]
        vae = recipe.inputs[output.vae]  # type: ignore[index]
        infos = self.input_infos[vae.name]
        prefix = vae_prefix(self.families.get(self.graph.base_input(output.node), "unknown"))
        baked = {key: info for key, info in infos.items() if key.startswith(prefix)}
        problem = None
        base_family = self.families.get(self.graph.base_input(output.node), "unknown")
        vae_family = self.families.get(vae.name, "unknown")
        if not baked:
            problem = f"{vae.path} holds no VAE tensors under {prefix}"
        missing = sorted(key for key in base if key.startswith(prefix) and key not in baked)
        if missing:
            problem = f"{vae.path} lacks {len(missing)} VAE tensor(s), e.g. {missing[0]}"
        if problem and vae_family not in ("unknown", "vae16", base_family):
            problem += (
                f" (it is a model of family {vae_family}, and {base_family} keeps its VAE under "
                f"{prefix}: use a VAE file of the base's kind)"
            )
        for key, info in baked.items():
            if key in base and base[key].shape != info.shape:
                problem = (
                    f"{key}: the VAE in {vae.path} has shape {list(info.shape)} and the model "
                    f"{list(base[key].shape)}"
                )
        if problem:
            raise RecipeError(
                f"output {name!r}: cannot bake the VAE: {problem}", recipe.path, vae.line
            )
        return {
            key: TensorInfo(base[key].dtype if key in base else info.dtype, info.shape)
            for key, info in baked.items()
        }


def _model_prefixes(family: str) -> list[str]:
    """The prefixes of the family's diffusion model (`model.diffusion_model.`)."""
    data = known(family)
    if data is None:
        return []
    return [c.prefix for c in data.components if c.name in ("unet", "transformer") and c.prefix]
