"""An adapter file read as a difference over a model's keys.

`AdapterReader` is a `ModelReader` whose keys are the checkpoint keys the
adapter patches and whose tensors are the weight deltas, computed when read
(in float32, float64 where any factor is), one key at a time: a build streams
`A + 0.8 * L` like any other recipe, and each adapter module is read once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from math import prod
from pathlib import Path

import blake3
import torch

from sdrecipe.adapters.algorithms import Factor
from sdrecipe.adapters.deltas import dora_axis, dora_delta
from sdrecipe.adapters.low_rank import LowRankDelta, Piece
from sdrecipe.adapters.modules import (
    AdapterError,
    AdapterModule,
    adapter_modules,
    check_factor_shapes,
)
from sdrecipe.adapters.naming import KeyPart, ModuleNames
from sdrecipe.arch import layout
from sdrecipe.arch.family import families, known
from sdrecipe.errors import BuildError, RecipeError
from sdrecipe.io.bounded_json import load_json
from sdrecipe.io.fingerprint import Fingerprint
from sdrecipe.io.finite import is_finite
from sdrecipe.io.safetensors_reader import SafetensorsReader
from sdrecipe.io.tensor_info import TensorInfo

# The families adapters are made for (those whose files say how kohya names LoRA outputs).
ADAPTER_FAMILIES = tuple(data.name for data in families() if data.adapters.lora is not None)
# diffusers writes the PEFT config (lora_alpha, r) into the file's metadata under this name,
# its fields prefixed by component; PEFT names begin with these.
PEFT_METADATA_KEY = "lora_adapter_metadata"
PEFT_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
TEXT_ENCODER_STEMS = ("text_encoder", "lora_te")
# PEFT config fields that would change a module's scale in ways sdrecipe does not apply.
PEFT_UNSUPPORTED = ("alpha_pattern",)
# 2: a LoRA's delta is added to the model as `addmm` (one rounding fewer than before).
DELTA_VERSION = "sdrecipe-adapter-delta-2"
# An alpha beyond this is infinite once the deltas are computed in float32.
FLOAT32_MAX = torch.finfo(torch.float32).max


class AdapterFile:
    """An adapter's safetensors file and its modules, from the header (and the
    alphas, one number per module): RecipeError for factors that do not fit
    together and for an alpha that is not a finite float32 number."""

    def __init__(self, reader: SafetensorsReader):
        self.reader = reader
        self.path = reader.path
        self.metadata = reader.metadata
        self.infos = reader.infos()
        try:
            self.modules = adapter_modules(reader.keys())
            for module in self.modules.values():
                check_factor_shapes(module, self.infos)
        except AdapterError as exc:
            raise RecipeError(f"cannot apply this adapter: {exc}", reader.path) from None
        self.peft_alphas = _peft_alphas(reader.metadata, reader.path)
        self.alphas = self._alphas()

    def _alphas(self) -> dict[str, torch.Tensor]:
        """Each module's alpha: its own, or a PEFT LoRA's from the metadata."""
        alphas = {}
        for stem, module in self.modules.items():
            key = module.keys.get("alpha")
            if key is not None:
                alphas[stem] = self.reader.tensor(key).clone()  # one number, not a view
                _check_alpha(float(alphas[stem]), f"module {stem}: alpha", self.path)
            elif "lora_A.weight" in module.keys:
                alpha = self._peft_alpha(module)
                if alpha is not None:
                    alphas[stem] = torch.tensor(alpha)
        return alphas

    def _peft_alpha(self, module: AdapterModule) -> float | None:
        """A PEFT module's alpha from the metadata: its component's (`unet.`,
        `transformer.`, `text_encoder.`... by the name's first part; a bare,
        `diffusion_model.` or `base_model.model.` name is the denoiser's), else
        the file's; with rsLoRA the scale is lora_alpha/√r, so alpha·√r here."""
        first = module.stem.split(".", 1)[0]
        component = first if first in PEFT_COMPONENTS else None
        if component is None and not module.stem.startswith(TEXT_ENCODER_STEMS):
            component = next((c for c in ("transformer", "unet") if c in self.peft_alphas), None)
        config = self.peft_alphas.get(component or "", self.peft_alphas.get(""))
        if config is None:
            return None
        alpha, rslora = config
        if not rslora:
            return alpha
        rank = module.rank(self.infos) or 1
        return alpha * math.sqrt(rank)

    def factor(
        self, module: AdapterModule, parameter: str, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """`module`'s `parameter` in `dtype`, or None where the module lacks it."""
        if parameter == "alpha":
            alpha = self.alphas.get(module.stem)
            return None if alpha is None else alpha.to(dtype)
        key = module.keys.get(parameter)
        return None if key is None else self.reader.tensor(key).to(dtype)

    def factors(self, module: AdapterModule, dtype: torch.dtype) -> Factor:
        """`module`'s factors by parameter name, in `dtype`, as its algorithm reads them."""
        return lambda parameter: self.factor(module, parameter, dtype)

    def compute_dtype(self, modules: list[AdapterModule]) -> torch.dtype:
        """float64 where any factor of `modules` is, else float32."""
        doubles = any(
            self.infos[key].dtype == torch.float64
            for module in modules
            for key in module.keys.values()
        )
        return torch.float64 if doubles else torch.float32

    def summary(self) -> dict[str, object]:
        """Algorithms, ranks and alphas, for `inspect`."""
        algorithms: dict[str, int] = {}
        ranks: set[int] = set()
        for module in self.modules.values():
            name = module.algorithm.name + ("+dora" if module.dora else "")
            algorithms[name] = algorithms.get(name, 0) + 1
            rank = module.rank(self.infos)
            if rank is not None:
                ranks.add(rank)
        alphas = sorted({float(alpha) for alpha in self.alphas.values()})
        namings = sorted({naming_of(module) for module in self.modules.values()})
        return {
            "modules": len(self.modules),
            "naming": " and ".join(namings),
            "algorithms": dict(sorted(algorithms.items())),
            "ranks": sorted(ranks),
            "alphas": alphas,
            "family": guess_family(self),
        }


def naming_of(module: AdapterModule) -> str:
    """The convention a module's names follow: kohya (sd-scripts, also with its
    split q/k/v), lycoris, onetrainer, xlabs, comfyui or peft (diffusers)."""
    stem = module.stem
    if module.algorithm.naming is not None:
        return module.algorithm.naming
    if stem.startswith(("lora_unet_", "lora_te")):
        return "kohya"
    if stem.startswith("lycoris_"):
        return "lycoris"
    if stem.startswith("lora_transformer_"):
        return "onetrainer"
    if ".processor." in stem:
        return "xlabs"
    if "lora_A.weight" in module.keys:
        return "peft"
    return "comfyui" if stem.startswith("diffusion_model.") else "other"


def _peft_alphas(metadata: Mapping[str, str], path: Path) -> dict[str, tuple[float, bool]]:
    """PEFT's lora_alpha from diffusers' metadata entry (JSON nested at most 32
    levels), by component: diffusers writes `{"transformer.lora_alpha": 8,
    "transformer.r": 4, ...}`, one prefix per component, older files
    `{"lora_alpha": 8, "r": 4}` (component "" here: every PEFT module); with
    each, whether it is rsLoRA (`use_rslora`: scale lora_alpha/√r)."""
    text = metadata.get(PEFT_METADATA_KEY)
    if not text:
        return {}
    try:
        config = load_json(text)
    except ValueError as exc:
        raise RecipeError(
            f"cannot apply this adapter: its metadata's {PEFT_METADATA_KEY} is no readable "
            f"JSON ({exc})",
            path,
        ) from None
    if not isinstance(config, dict):
        return {}
    where = f"its metadata's {PEFT_METADATA_KEY}"
    alphas = {}
    rslora = {}
    for name, value in config.items():
        component, _, field = name.rpartition(".")
        if field in PEFT_UNSUPPORTED and value:
            raise RecipeError(
                f"cannot apply this adapter: {name} in {where} gives some modules alphas of "
                "their own, which sdrecipe does not apply",
                path,
            )
        if field == "use_rslora":
            rslora[component] = value is True
        if (
            field == "r"
            and value is not None
            and (isinstance(value, bool) or not isinstance(value, int) or value < 1)
        ):
            raise RecipeError(
                f"cannot apply this adapter: {name} in {where} is {json.dumps(value)}, "
                "not a positive whole number (a LoRA's rank)",
                path,
            )
        if field != "lora_alpha" or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RecipeError(
                f"cannot apply this adapter: {name} in {where} is {json.dumps(value)}, "
                "not a number",
                path,
            )
        number = float(value) if isinstance(value, float) or abs(value) < 1 << 128 else math.inf
        _check_alpha(number, f"{name} in {where}", path)
        alphas[component] = number
    return {c: (alpha, rslora.get(c, rslora.get("", False))) for c, alpha in alphas.items()}


def _check_alpha(value: float, what: str, path: Path) -> None:
    """RecipeError unless `value` is finite in float32, where deltas are computed."""
    if not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
        raise RecipeError(
            f"cannot apply this adapter: {what} is {value:g}, which is not a finite "
            "number in float32",
            path,
        )


@dataclass(frozen=True)
class _Patch:
    """Module `module` patches `part` of a key."""

    part: KeyPart
    module: AdapterModule

    @property
    def parameter(self) -> str:
        return self.part.parameter


class AdapterReader:
    """An adapter as a difference over the keys of `base` (a model of `family`).

    Raises RecipeError when a module's delta does not fit the key it names (an
    adapter for another family). DoRA deltas depend on the base's weights, so a
    reader applies to the model it was opened against.
    """

    def __init__(
        self, adapter: AdapterFile, base_infos: Mapping[str, TensorInfo], base, family: str
    ):
        self.adapter = adapter
        self.path: Path = adapter.path
        self.metadata = adapter.metadata
        self.family = family
        self._base = base
        self._patches: dict[str, list[_Patch]] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        used: set[str] = set()
        modules = adapter.modules
        names = ModuleNames(family, base_infos)
        for key, info in base_infos.items():
            if not info.is_floating:
                continue
            patches = []
            for part in names(key):
                for module in (modules[n] for n in part.names if n in modules):
                    wanted = (
                        module.changes_weight if part.parameter == "weight" else module.changes_bias
                    )
                    if wanted:
                        patches.append(_Patch(part, module))
                        used.add(module.stem)
            if patches:
                self._patches[key] = patches
                shape = self._delta_shape(key, info, patches)
                for patch in patches:
                    if patch.parameter == "weight" and patch.module.dora:
                        rows = patch.part.rows(shape[0])
                        self._check_dora(key, patch.module, (rows.stop - rows.start, *shape[1:]))
                dtype = adapter.compute_dtype([p.module for p in patches])
                self._infos[key] = TensorInfo(dtype, shape)
                self._shapes[key] = info.shape
        self.unmatched = [stem for stem in modules if stem not in used]

    def _delta_shape(self, key: str, target: TensorInfo, patches: list[_Patch]) -> tuple[int, ...]:
        """The delta's shape: the key's, or for a key with more input channels
        (inpainting conv_in) the adapter's fewer leading channels."""
        infos = self.adapter.infos
        for patch in patches:
            module = patch.module
            if patch.parameter == "bias":
                rows, numel, kernel = module.bias_size(infos)
            else:
                rows, numel, kernel = module.weight_size(infos)
            expected = patch.part.share(target.numel)
            part_rows = patch.part.rows(target.shape[0])
            kernel_fits = kernel in ((), tuple(target.shape[2:])) or all(k == 1 for k in kernel)
            if numel == expected and rows == part_rows.stop - part_rows.start and kernel_fits:
                continue
            shape = target.shape
            channels_differ = (
                patch.part.whole
                and len(shape) == 4
                and rows == shape[0]
                and numel % (rows * shape[2] * shape[3]) == 0
                and kernel in ((), shape[2:])
                and numel < target.numel
            )
            if channels_differ:
                return (rows, numel // (rows * shape[2] * shape[3]), *shape[2:])
            raise self._misfit(module.stem, (rows, numel, kernel), key, shape, patch.part)
        return target.shape

    def _check_dora(self, key: str, module: AdapterModule, shape: tuple[int, ...]) -> None:
        """RecipeError unless `dora_scale` holds one value per row (or per input
        column) of the delta of `shape` that `module` makes at `key`."""
        magnitude = self.adapter.infos[module.keys["dora_scale"]].shape
        axis = dora_axis(magnitude)
        if axis < len(shape) and prod(magnitude) == shape[axis]:
            return
        what = "input columns" if axis else "rows"
        size = shape[axis] if axis < len(shape) else 1
        raise RecipeError(
            f"cannot apply this adapter: module {module.stem}: dora_scale (shape "
            f"{list(magnitude)}) holds {prod(magnitude)} values, and the delta it scales at "
            f"{key} has {size} {what}",
            self.path,
        )

    def _misfit(
        self,
        stem: str,
        size: tuple[int, int, tuple[int, ...]],
        key: str,
        shape: tuple[int, ...],
        part: KeyPart,
    ) -> RecipeError:
        rows, numel, kernel = size
        span = part.rows(shape[0])
        where = (
            ""
            if part.whole
            else f" (its slice, rows {span.start}-{span.stop - 1}, takes "
            f"{part.share(prod(shape))} elements)"
        )
        made = f"{rows} rows, {numel} elements" + (f", kernel {list(kernel)}" if kernel else "")
        guessed = guess_family(self.adapter)
        looks = f"; its modules look like a {guessed} adapter" if guessed != "unknown" else ""
        return RecipeError(
            f"this adapter does not fit a {self.family} model: module {stem} makes a "
            f"delta of {made} for {key} of shape {list(shape)}{where}{looks}",
            self.path,
        )

    def keys(self) -> list[str]:
        """The checkpoint keys the adapter patches."""
        return list(self._infos)

    def info(self, key: str) -> TensorInfo:
        """Dtype and shape of the delta at `key`."""
        return self._infos[key]

    def infos(self) -> dict[str, TensorInfo]:
        """Dtype and shape of every delta."""
        return dict(self._infos)

    @property
    def has_dora(self) -> bool:
        """True when some module's delta depends on the base's weights."""
        return any(p.module.dora for patches in self._patches.values() for p in patches)

    def low_rank(self, key: str) -> LowRankDelta | None:
        """The delta at `key` as factors, where the algorithm of every module
        patching it gives them (`Algorithm.low_rank`: a plain LoRA, split or not),
        none has DoRA, all are finite and the delta is the key's shape; None
        otherwise (`tensor` then makes it whole)."""
        info = self._infos[key]
        if info.shape != self._shapes[key]:
            return None
        pieces = []
        for patch in self._patches[key]:
            module = patch.module
            if patch.parameter != "weight" or module.dora:
                return None
            factors = self.adapter.factors(module, info.dtype)
            pairs = module.algorithm.low_rank(module.keys, patch.part, factors)
            if pairs is None:
                return None
            start = patch.part.rows(info.shape[0]).start
            for up, down in pairs:
                pieces.append(Piece(slice(start, start + up.shape[0]), up, down))
                start += up.shape[0]
        delta = LowRankDelta(info.shape, info.dtype, tuple(pieces))
        return delta if delta.finite() else None

    def tensor(self, key: str) -> torch.Tensor:
        """The delta at `key` (a new tensor), computed from the modules that patch it."""
        info = self._infos[key]
        patches = self._patches[key]
        if len(patches) == 1 and patches[0].part.whole:
            delta = self._part(key, patches[0], info.dtype, info.shape, None)
        else:
            delta = torch.zeros(info.shape, dtype=info.dtype)
            done: list[slice] = []
            for patch in patches:  # a slice no module patches stays zero
                rows = patch.part.rows(info.shape[0])
                part = self._part(key, patch, info.dtype, delta[rows].shape, rows)
                if any(r.start < rows.stop and rows.start < r.stop for r in done):
                    delta[rows] += part  # a whole-key module and a slice's both patch it
                else:
                    delta[rows] = part
                done.append(rows)
        if not is_finite(delta):
            raise self._not_finite(key, [patch.module for patch in patches], info.dtype)
        return delta

    def _not_finite(
        self, key: str, modules: list[AdapterModule], dtype: torch.dtype
    ) -> RecipeError | BuildError:
        """The error for a delta at `key` with infinities or NaN: RecipeError naming
        the factor that holds them, else BuildError (finite factors that overflow)."""
        for module in modules:
            for parameter, file_key in module.keys.items():
                if not is_finite(self.adapter.reader.tensor(file_key)):
                    return RecipeError(
                        f"cannot apply this adapter: module {module.stem}: {parameter} holds "
                        "infinite or NaN values",
                        self.path,
                    )
        stems = ", ".join(module.stem for module in modules)
        return BuildError(
            f"module {stems} gives infinite or NaN values at {key} from finite factors (they "
            f"overflow {str(dtype).removeprefix('torch.')}, or DoRA's weights do); no output "
            "was written",
            self.path,
        )

    def _part(
        self,
        key: str,
        patch: _Patch,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        rows: slice | None,
    ) -> torch.Tensor:
        module = patch.module
        factor = self.adapter.factors(module, dtype)
        if patch.parameter == "bias":
            return patch.part.in_order(module.algorithm.bias_delta(factor).reshape(shape))
        delta = module.algorithm.delta(factor).reshape(shape)
        if module.dora:
            base = self._base.tensor(key)
            base = patch.part.in_order(base if rows is None else base[rows]).to(dtype)
            magnitude = factor("dora_scale")
            assert magnitude is not None
            delta = dora_delta(base[:, : shape[1]] if base.dim() > 1 else base, delta, magnitude)
        return patch.part.in_order(delta)

    def raw(self, key: str) -> memoryview:
        """The delta's bytes."""
        return memoryview(self.tensor(key).contiguous().reshape(-1).view(torch.uint8).numpy())

    def fingerprint(self) -> Fingerprint:
        """The adapter file's own fingerprint (its tensors under their own names)."""
        return self.adapter.reader.fingerprint()

    def tensor_digests(self, fingerprint: Fingerprint) -> dict[str, str]:
        """Each patched key's digest: of the factors that make its delta, and how."""
        digests = {}
        for key, patches in self._patches.items():
            parts = [
                (
                    *_described(p.part),
                    p.parameter,
                    p.module.algorithm.name,
                    sorted(
                        (name, fingerprint.tensors[file_key])
                        for name, file_key in p.module.keys.items()
                    ),
                    _alpha_of(self.adapter, p.module),
                )
                for p in patches
            ]
            info = self._infos[key]
            described = [
                DELTA_VERSION,
                str(info.dtype),
                list(info.shape),
                parts,
            ]
            digests[key] = blake3.blake3(json.dumps(described).encode()).hexdigest()
        return digests


def _alpha_of(adapter: AdapterFile, module: AdapterModule) -> float | None:
    """The alpha a module's delta is computed with where it is not a tensor of
    the file (PEFT's, from the metadata), for digests; None otherwise."""
    if "alpha" in module.keys or module.stem not in adapter.alphas:
        return None
    return float(adapter.alphas[module.stem])


def _described(part: KeyPart) -> tuple[object, ...]:
    """A part in a delta's digest: (index, count) for one of equal row blocks, as
    digests have always said it; (start, stop, total, swapped) for any other."""
    if part.stop - part.start == 1 and not part.swapped:
        return part.start, part.total
    return part.start, part.stop, part.total, part.swapped


@cache
def _layout_names(family: str) -> dict[str, int]:
    """Module name → elements of its delta, over a real `family` layout."""
    data = known(family)
    shapes, _ = layout(data.layout if data is not None and data.layout else family)
    names = ModuleNames(family, shapes)
    found = {}
    for key, shape in shapes.items():
        for part in names(key):
            for name in part.names:
                found[name] = part.share(prod(shape))
    return found


def guess_family(adapter: AdapterFile) -> str:
    """The family whose real layout fits the adapter's modules by name and size
    (by name alone for shrunken test adapters), or "unknown"."""
    best, best_score = "unknown", (0, 0)
    for family in ADAPTER_FAMILIES:
        names = _layout_names(family)
        named = fitting = 0
        for stem, module in adapter.modules.items():
            if stem not in names or not module.changes_weight:
                continue
            named += 1
            fitting += module.weight_size(adapter.infos)[1] == names[stem]
        if (fitting, named) > best_score:
            best, best_score = family, (fitting, named)
    return best
