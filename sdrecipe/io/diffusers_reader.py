"""Diffusers folders, read as single-file (LDM/SGM) models.

A diffusers pipeline folder keeps each component in a folder of its own
(`unet/` or `transformer/`, `vae/`, `text_encoder/` to `text_encoder_3/`),
with a config and its weights: safetensors or pickled `.bin`, optionally the
`.fp16` variant, optionally sharded behind an index file. This reader
presents all of it under single-file key names and tensor layouts, so that a
folder can be any input of a recipe. A standalone VAE folder
(`AutoencoderKL`) reads as `first_stage_model.*`. A Flux.1 or SD3 folder
reads as ComfyUI's all-in-one checkpoint, or, when it holds the transformer
alone, as the bare transformer file BFL ships.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from sdrecipe.arch import CLIP_POSITION_IDS, V_PREDICTION_MARKER, ZERO_TERMINAL_SNR_MARKER
from sdrecipe.arch import COMPONENTS as MODEL_COMPONENTS
from sdrecipe.arch.detect import detect
from sdrecipe.arch.diffusers_names import (
    BARE_WHEN_ALONE,
    COMPONENTS,
    WITHOUT_POSITION_IDS,
    Source,
    is_vae_attention_weight,
    open_clip_from_diffusers,
    t5_from_diffusers,
    unet_from_diffusers,
    up_levels_with_attention,
    vae_from_diffusers,
)
from sdrecipe.arch.diffusers_tables import Table, has_table, table
from sdrecipe.errors import RecipeError
from sdrecipe.io.bounded_json import load_json
from sdrecipe.io.checkpoint_reader import CheckpointReader
from sdrecipe.io.fingerprint import (
    Fingerprint,
    folder_files,
    folder_sha256,
    plain_sha256,
    tensor_digest,
)
from sdrecipe.io.safetensors_reader import SafetensorsReader
from sdrecipe.io.shard_index import is_shard_index, read_index
from sdrecipe.io.sharded_reader import ShardedSafetensorsReader
from sdrecipe.io.tensor_info import TensorInfo

# The components a diffusers folder keeps in folders of their own.
PIPELINE_COMPONENTS = tuple(name for name in MODEL_COMPONENTS if name not in ("ema", "other"))
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
STANDALONE_VAE = (("first_stage_model.", ".", "vae"),)
HF_CLIP_POSITION_EMBEDDING = "text_model.embeddings.position_embedding.weight"
PREDICTION_TYPES = {"v_prediction": "v", "epsilon": "epsilon", "sample": "sample"}

WeightReader = SafetensorsReader | CheckpointReader


def weight_files(folder: Path) -> list[Path]:
    """A component folder's weight files, in diffusers' order of preference:
    safetensors before `.bin`, full precision before the `.fp16` variant; a
    sharded component gives its index (safetensors, read by
    `ShardedSafetensorsReader`) or every shard its index names (`.bin`)."""
    preference = itertools.product(("safetensors", "bin"), ("", ".fp16"), WEIGHT_STEMS)
    for extension, variant, stem in preference:
        single = folder / f"{stem}{variant}.{extension}"
        if single.is_file():
            return [single]
        indexes = (
            f"{stem}{variant}.{extension}.index.json",
            f"{stem}.{extension}.index{variant}.json",
        )
        for index in dict.fromkeys(indexes):
            if (folder / index).is_file():
                if extension == "safetensors":
                    return [folder / index]
                return _shards(folder / index)
    return []


def _shards(index: Path) -> list[Path]:
    """The `.bin` shards an index names (checked: see `read_index`)."""
    return read_index(index, suffix=".bin").files()[1:]


def _read_json(path: Path) -> dict:
    try:
        data = load_json(path.read_text())
    except (OSError, ValueError) as exc:
        raise RecipeError(f"cannot read the config: {exc}", path) from None
    if not isinstance(data, dict):
        raise RecipeError("the config is not a JSON object", path)
    return data


def _single_file_form(
    scheme: str, name: str, info: TensorInfo, up_levels: frozenset[int]
) -> tuple[str, str, TensorInfo] | None:
    """A stored tensor's single-file name (without prefix), layout kind and info;
    None for tensors the single-file layout does not keep."""
    if scheme == "unet":
        return unet_from_diffusers(name, up_levels), "same", info
    if scheme == "vae":
        key = vae_from_diffusers(name)
        if is_vae_attention_weight(key) and len(info.shape) == 2:
            return key, "conv1x1", TensorInfo(info.dtype, (*info.shape, 1, 1))
        return key, "same", info
    if scheme in ("hf_clip", "t5"):
        return name, "same", info
    mapped = open_clip_from_diffusers(name)
    if mapped is None:
        return None
    key, kind = mapped
    if kind == "transpose":
        info = TensorInfo(info.dtype, tuple(reversed(info.shape)))
    return key, kind, info


class DiffusersReader:
    """A diffusers folder's tensors under single-file names and layouts.

    Most tensors are the stored ones, zero-copy. OpenCLIP's q/k/v projections
    are concatenated into `in_proj`, as Flux's and SD3's split projections are
    into theirs, modulations diffusers keeps as (scale, shift) are swapped back
    to (shift, scale), T5's `encoder.embed_tokens` alias is left out, the
    text projection of OpenCLIP is transposed, the
    VAE's linear attention weights are seen as 1x1 convolutions, and CLIP's
    position ids (not saved by recent transformers) are recreated, as are the
    `v_pred` / `ztsnr` markers of a v-prediction SDXL folder (from its scheduler).
    """

    def __init__(self, path: Path):
        self.path = path
        self._readers: dict[Path, WeightReader] = {}
        stored: dict[str, dict[str, WeightReader]] = {}
        for folder in self._component_folders():
            stored[folder] = {}
            for file in weight_files(path / folder):
                if is_shard_index(file):
                    sharded = ShardedSafetensorsReader(file)
                    self._readers.update(sharded.readers)
                    stored[folder].update(sharded.owners())
                    continue
                reader: WeightReader = (
                    SafetensorsReader(file)
                    if file.suffix == ".safetensors"
                    else CheckpointReader(file)
                )
                self._readers[file] = reader
                stored[folder].update(dict.fromkeys(reader.keys(), reader))
            if not stored[folder]:
                raise RecipeError(
                    f"{folder}/ holds no weights (diffusion_pytorch_model.safetensors, "
                    "model.safetensors, their .fp16 variants, .bin or a shard index)",
                    path,
                )
        self._stored = stored
        self.family = self._family()
        self._sources: dict[str, Source] = {}
        self._infos: dict[str, TensorInfo] = {}
        layout = STANDALONE_VAE if self.family == "vae" else COMPONENTS[self.family]
        bare = BARE_WHEN_ALONE.get(self.family)
        for prefix, folder, scheme in layout:
            if folder not in stored:
                continue
            if bare is not None and bare[1] == folder and list(stored) == [folder]:
                prefix = ""  # the transformer alone: a bare file, as BFL ships Flux.1
            if has_table(self.family, scheme):
                self._map_table(prefix, folder, table(self.family, scheme))
            else:
                self._map_component(prefix, folder, scheme)
        self.metadata = self._metadata()
        self._add_markers()

    # --- structure ----------------------------------------------------------------

    def _component_folders(self) -> list[str]:
        present = [name for name in PIPELINE_COMPONENTS if (self.path / name).is_dir()]
        if present:
            return present
        config = self.path / "config.json"
        if config.is_file() and _read_json(config).get("_class_name") == "AutoencoderKL":
            return ["."]
        raise RecipeError(
            "not a diffusers folder: it has none of unet/, transformer/, vae/, "
            "text_encoder/, text_encoder_2/, text_encoder_3/ and is not an AutoencoderKL folder",
            self.path,
        )

    def _family(self) -> str:
        """From the components present; SD1 and SD2 differ in the UNet's `proj_in`
        (a 1x1 convolution or a linear layer) or else in the text encoder's
        activation (CLIP's quick_gelu, OpenCLIP's gelu). A transformer is named
        by the tables of the families that have one, and detected as a single
        file is."""
        stored = self._stored
        if "." in stored:
            return "vae"
        if "transformer" in stored:
            return self._transformer_family()
        if "text_encoder_2" in stored:
            return "sdxl" if "text_encoder" in stored else "sdxl-refiner"
        for key, reader in stored.get("unet", {}).items():
            if key.endswith(".proj_in.weight"):
                return "sd2" if len(reader.info(key).shape) == 2 else "sd1"
        config = self.path / "text_encoder" / "config.json"
        if config.is_file() and _read_json(config).get("hidden_act") == "gelu":
            return "sd2"
        return "sd1"

    def _transformer_family(self) -> str:
        """The family whose table names every tensor of `transformer/` and whose
        detection the names it gives then pass (SD3 and SD3.5 share a table)."""
        stored = self._stored["transformer"]
        candidates = {
            family: (prefix, scheme)
            for family, components in COMPONENTS.items()
            for prefix, folder, scheme in components
            if folder == "transformer" and has_table(family, scheme)
        }
        for family, (prefix, scheme) in candidates.items():
            named = table(family, scheme)
            last = named.last_blocks(stored, diffusers=True)
            try:
                infos = {
                    prefix + named.from_diffusers(name, last).names[0]: reader.info(name)
                    for name, reader in stored.items()
                }
            except KeyError:
                continue
            found = detect(infos, {}).family
            if found in candidates:
                return found
        raise RecipeError(
            "transformer/ holds a transformer of no family sdrecipe knows "
            f"({', '.join(candidates)} were tried)",
            self.path,
        )

    def _add(self, key: str, source: Source, info: TensorInfo) -> None:
        if key in self._sources:
            raise RecipeError(
                f"{source.component}/ has two tensors for {key} ({source.keys[0]} and "
                f"{self._sources[key].keys[0]})",
                self.path,
            )
        self._sources[key] = source
        self._infos[key] = info

    def _map_component(self, prefix: str, folder: str, scheme: str) -> None:
        stored = self._stored[folder]
        levels = up_levels_with_attention(stored) if scheme == "unet" else frozenset()
        fused: dict[str, dict[str, str]] = {}
        for name, reader in stored.items():
            if scheme == "t5" and t5_from_diffusers(name, stored) is None:
                continue
            try:
                mapped = _single_file_form(scheme, name, reader.info(name), levels)
            except KeyError:
                raise RecipeError(
                    f"{folder}/ holds {name}, which has no single-file name", self.path
                ) from None
            if mapped is None:
                continue
            key, kind, info = mapped
            if kind == "qkv":
                fused.setdefault(prefix + key, {})[name.split(".")[-2][0]] = name
            else:
                self._add(prefix + key, Source(folder, (name,), kind), info)
        for key, parts in fused.items():
            self._add_fused(key, folder, parts)
        recreate = (self.family, folder) not in WITHOUT_POSITION_IDS
        if scheme == "hf_clip" and CLIP_POSITION_IDS not in stored and recreate:
            embedding = stored.get(HF_CLIP_POSITION_EMBEDDING)
            if embedding is not None:
                positions = embedding.info(HF_CLIP_POSITION_EMBEDDING).shape[0]
                info = TensorInfo(torch.int64, (1, positions))
                self._add(prefix + CLIP_POSITION_IDS, Source(folder, (), "position_ids"), info)

    def _map_table(self, prefix: str, folder: str, named: Table) -> None:
        """A component named by a table: split tensors are concatenated back,
        swapped halves swapped back."""
        stored = self._stored[folder]
        last = named.last_blocks(stored, diffusers=True)
        splits: dict[str, tuple[tuple[int, ...], dict[int, str]]] = {}
        for name, reader in stored.items():
            try:
                mapped = named.from_diffusers(name, last)
            except KeyError:
                raise RecipeError(
                    f"{folder}/ holds {name}, which has no single-file name", self.path
                ) from None
            key = prefix + mapped.names[0]
            info = reader.info(name)
            if mapped.kind == "swap" and (not info.shape or info.shape[0] % 2):
                raise RecipeError(
                    f"{folder}/ holds {name} of shape {list(info.shape)}, whose rows "
                    f"cannot be halves (of {key})",
                    self.path,
                )
            if mapped.kind == "split":
                splits.setdefault(key, (mapped.parts, {}))[1][mapped.index] = name
            else:
                self._add(key, Source(folder, (name,), mapped.kind), info)
        for key, (proportions, parts) in splits.items():
            if set(parts) != set(range(len(proportions))):
                raise RecipeError(
                    f"{folder}/ lacks part of {key}'s fused projection "
                    f"(has {', '.join(parts[i] for i in sorted(parts))})",
                    self.path,
                )
            names = tuple(parts[i] for i in range(len(proportions)))
            infos = [stored[name].info(name) for name in names]
            rows = [info.shape[0] for info in infos if info.shape]
            unit = rows[0] // proportions[0] if len(rows) == len(names) else 0
            if (
                len({(info.dtype, info.shape[1:]) for info in infos}) != 1
                or not unit
                or rows != [unit * part for part in proportions]
            ):
                raise RecipeError(
                    f"{folder}/: the parts of {key} ({', '.join(names)}) do not fit together",
                    self.path,
                )
            shape = (sum(rows), *infos[0].shape[1:])
            self._add(
                key,
                Source(folder, names, "split", proportions),
                TensorInfo(infos[0].dtype, shape),
            )

    def _add_fused(self, key: str, folder: str, parts: dict[str, str]) -> None:
        if set(parts) != {"q", "k", "v"}:
            raise RecipeError(
                f"{folder}/ lacks part of {key}'s q/k/v projections (has {sorted(parts)})",
                self.path,
            )
        names = (parts["q"], parts["k"], parts["v"])
        infos = {self._stored[folder][name].info(name) for name in names}
        if len(infos) != 1:
            raise RecipeError(f"{folder}/: the q/k/v projections of {key} differ", self.path)
        (info,) = infos
        self._add(
            key,
            Source(folder, names, "qkv"),
            TensorInfo(info.dtype, (3 * info.shape[0], *info.shape[1:])),
        )

    def _metadata(self) -> dict[str, str]:
        """The UNet file's header metadata (sdrecipe lineage), and the scheduler's
        prediction type."""
        metadata: dict[str, str] = {}
        model = self._stored.get("unet") or self._stored.get("transformer")
        if model:
            metadata.update(next(iter(model.values())).metadata)
        prediction = self._scheduler().get("prediction_type")
        if prediction in PREDICTION_TYPES:
            metadata["prediction_type"] = PREDICTION_TYPES[prediction]
        return metadata

    def _scheduler(self) -> dict:
        """The scheduler's config, or {} when the folder has none."""
        scheduler = self.path / "scheduler" / "scheduler_config.json"
        return _read_json(scheduler) if scheduler.is_file() else {}

    def _add_markers(self) -> None:
        """An SDXL folder whose scheduler samples v-prediction reads with the
        `v_pred` marker a single file carries for it, and with `ztsnr` too when
        the betas are rescaled to zero terminal SNR (empty float32 tensors)."""
        scheduler = self._scheduler()
        if self.family != "sdxl" or scheduler.get("prediction_type") != "v_prediction":
            return
        markers = [V_PREDICTION_MARKER]
        if scheduler.get("rescale_betas_zero_snr") is True:
            markers.append(ZERO_TERMINAL_SNR_MARKER)
        for key in markers:
            self._add(key, Source("scheduler", (), "marker"), TensorInfo(torch.float32, (0,)))

    # --- the ModelReader interface ---------------------------------------------------

    def keys(self) -> list[str]:
        """Tensor names in single-file form."""
        return list(self._infos)

    def info(self, key: str) -> TensorInfo:
        """Dtype and shape of `key`, in the single-file layout."""
        return self._infos[key]

    def infos(self) -> dict[str, TensorInfo]:
        """Dtype and shape of every tensor."""
        return dict(self._infos)

    def tensor(self, key: str) -> torch.Tensor:
        """`key` in the single-file layout; callers must not modify it."""
        source = self._sources[key]
        info = self._infos[key]
        if source.kind == "position_ids":
            return torch.arange(info.shape[1], dtype=info.dtype).reshape(info.shape)
        if source.kind == "marker":
            return torch.empty(info.shape, dtype=info.dtype)
        stored = self._stored[source.component]
        parts = [stored[name].tensor(name) for name in source.keys]
        if source.kind in ("qkv", "split"):
            return torch.cat(parts)
        if source.kind == "swap":
            half = parts[0].shape[0] // 2
            return torch.cat((parts[0][half:], parts[0][:half]))
        if source.kind == "transpose":
            return parts[0].t().contiguous()
        return parts[0].view(info.shape)

    def raw(self, key: str) -> memoryview:
        """The bytes of `key` in the single-file layout (zero-copy where the layouts agree)."""
        source = self._sources[key]
        if source.kind in ("same", "conv1x1"):
            name = source.keys[0]
            return self._stored[source.component][name].raw(name)
        return self.tensor(key).contiguous().reshape(-1).view(torch.uint8).numpy().data

    def fingerprint(self) -> Fingerprint:
        """The folder's sha256 (see `folder_sha256`) and each tensor's digest.

        Weight files are read once for both; tensors whose layout changes are
        hashed again in single-file form.
        """
        file_sha256s: dict[str, str] = {}
        stored_digests: dict[tuple[str, str], str] = {}
        for file, reader in self._readers.items():
            result = reader.fingerprint()
            file_sha256s[str(file.relative_to(self.path))] = result.sha256
            folder = str(file.parent.relative_to(self.path))
            for name, digest in result.tensors.items():
                stored_digests[(folder, name)] = digest
        for name in folder_files(self.path):
            if name not in file_sha256s:
                file_sha256s[name] = plain_sha256(self.path / name)
        digests = {}
        for key, source in self._sources.items():
            if source.kind == "same":
                digests[key] = stored_digests[(source.component, source.keys[0])]
            else:
                digests[key] = tensor_digest(self._infos[key], [self.raw(key)])
        return Fingerprint(folder_sha256(file_sha256s), "", digests)
