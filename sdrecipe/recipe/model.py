"""The validated, resolved recipe that the rest of sdrecipe works from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from sdrecipe.arch import component_of
from sdrecipe.recipe.expr import Expr, format_expression
from sdrecipe.recipe.key_regex import KeyRegex


@dataclass(frozen=True)
class Input:
    """An input file: a model, or an adapter (LoRA, LyCORIS), whose `space` is
    `difference`; the space is None until the file's header is read (see
    `sdrecipe.recipe.spaces.check_spaces`). A remote input has a `url`; its
    `path` is where its local copy is kept once it is fetched (see
    `sdrecipe.io.remote_inputs`)."""

    name: str
    path: Path
    sha256: str | None
    line: int | None
    space: str | None = None
    url: str | None = None

    @property
    def file_name(self) -> str:
        """The file's name: of the URL for a remote input (`path` is then its
        local copy, see `sdrecipe.io.remote_inputs`)."""
        return PurePosixPath(self.url).name if self.url else self.path.name

    @property
    def written_path(self) -> str:
        """How provenance and locks name the file beside the recipe: its URL for a
        remote input, else its file name."""
        return self.url or self.path.name


@dataclass(frozen=True)
class KeySelection:
    """Which keys a node merges; outside it, the base passes through."""

    only: frozenset[str] = frozenset()
    exclude: frozenset[str] = frozenset()
    include_keys: tuple[KeyRegex, ...] = ()
    exclude_keys: tuple[KeyRegex, ...] = ()

    def selects(self, key: str, family: str = "unknown") -> bool:
        """True when the node merges `key` of a model of `family`."""
        component = component_of(key, family)
        return (
            (not self.only or component in self.only)
            and component not in self.exclude
            and (not self.include_keys or any(p.search(key) for p in self.include_keys))
            and not any(p.search(key) for p in self.exclude_keys)
        )

    def describe(self) -> str:
        """e.g. `only: unet; exclude_keys: ^x` (empty when everything is selected)."""
        parts = [
            ("only", sorted(self.only)),
            ("exclude", sorted(self.exclude)),
            ("include_keys", [p.pattern for p in self.include_keys]),
            ("exclude_keys", [p.pattern for p in self.exclude_keys]),
        ]
        return "; ".join(f"{name}: {', '.join(values)}" for name, values in parts if values)


@dataclass(frozen=True)
class Node:
    """A named merge expression over inputs and other nodes.

    `cache` True or False stores the node's values in the cache or keeps them
    out (recomputed whenever a node that uses them is rebuilt); None leaves it
    to the cost rule of `sdrecipe.plan.cache_policy`. `force` True merges operands of
    different architectures, which is otherwise refused. `allow_unmatched` True
    applies adapters some of whose modules match no key of the model. `space`
    is `model` or `difference`, None until the inputs' headers are read (see
    `sdrecipe.recipe.spaces`). `origin` is the
    node a matrix variant was made from (see `sdrecipe.recipe.matrix`).
    """

    name: str
    expr: Expr
    line: int | None
    cache: bool | None = None
    force: bool = False
    allow_unmatched: bool = False
    selection: KeySelection = field(default_factory=KeySelection)
    space: str | None = None
    origin: str | None = None

    @property
    def written_name(self) -> str:
        """The name as the recipe writes it: a matrix variant's node's name."""
        return self.origin or self.name

    @property
    def signature(self) -> str:
        """The canonical expression, with the key selection if there is one."""
        selection = self.selection.describe()
        expression = format_expression(self.expr)
        return f"{expression} [{selection}]" if selection else expression


# Names how `format: lora` outputs are extracted; a change that alters their
# bytes changes this, so outputs cached before are not reused.
LORA_EXTRACTION = "sdrecipe-lora-extraction-1"


@dataclass(frozen=True)
class LoraOptions:
    """How a `format: lora` output is extracted: the rank of linear and 1x1
    layers, of 3x3 convolutions (None: those are not extracted), the clamp
    quantile, whether text encoders are included (`auto`: if they changed),
    the factors' dtype, and whose names the file uses (`kohya`'s, or `peft`:
    diffusers' `lora_A`/`lora_B` by diffusers module)."""

    rank: int = 64
    conv_rank: int | None = None
    clamp_quantile: float = 0.99
    text_encoder: bool | str = "auto"
    dtype: str = "float16"
    # Out of the repr, which identifies kohya-named outputs as it always has.
    naming: str = field(default="kohya", repr=False)


@dataclass(frozen=True)
class Output:
    """A node written to a file; `dtype` None keeps each base tensor's dtype.

    `format` is `safetensors` (one file), `diffusers` (a folder) or `lora` (a
    LoRA extracted from a difference node, with `lora` options).
    `prune_ema` drops `model_ema.*`; `vae` names the input whose VAE
    replaces the node's (`first_stage_model.*`); `metadata` adds header fields;
    `space` is `model`, or `difference` for a file of deltas; `origin` is the
    output a matrix variant was made from, and `variables` the matrix values
    it was made with (in the matrix's order). `max_shard_size` (bytes of tensor
    data) writes a safetensors model, or each weights file of a diffusers
    folder, as shards behind an index (see `sdrecipe.io.shard_layout`).
    """

    node: str
    path: Path
    dtype: str | None
    line: int | None
    format: str = "safetensors"
    prune_ema: bool = False
    vae: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    space: str = "model"
    lora: LoraOptions | None = None
    origin: str | None = None
    max_shard_size: int | None = None
    scaled: bool = False
    quant: str | None = None
    variables: tuple[tuple[str, str | int | float], ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class Recipe:
    """A recipe whose names, expressions, methods and parameters are all valid;
    `meaning` hashes what it says (see `sdrecipe.recipe.loader.parse_recipe`)."""

    path: Path
    text: str
    inputs: dict[str, Input]
    nodes: dict[str, Node]
    outputs: dict[str, Output]
    meaning: str = ""
