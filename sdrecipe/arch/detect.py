"""What a checkpoint is, told from its key names and shapes alone (no tensor data).

Each family file (`sdrecipe/arch/families/`) lists signatures: keys that must
be present or absent, with or without a prefix such as
`model.diffusion_model.`, and shape rules. The first signature that holds, in
priority order, names the family; the family's variant table reads the input
layer's width. Absolute widths are never needed, so detection also works on
shrunken test models. A layout no signature fits is `unknown`, with the
prefixes found.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sdrecipe.arch import V_PREDICTION_MARKER, ZERO_TERMINAL_SNR_MARKER
from sdrecipe.arch.family import UNKNOWN, Signature, known, signatures
from sdrecipe.io.tensor_info import TensorInfo

PREDICTION_METADATA_KEYS = ("modelspec.prediction_type", "prediction_type")


@dataclass(frozen=True)
class Architecture:
    """Family (a family file's name or `unknown`), variant (`normal`,
    `inpainting`, `instruct-pix2pix`, `fill`, ... or `unknown`), EMA presence,
    prediction type when a `v_pred` marker or the metadata states it, and the
    key prefixes found. `prediction_source` names what stated the prediction
    type; `zero_terminal_snr` is set by a `ztsnr` marker. `kind` is the
    release where the family tells them apart (Flux.1 `dev` or `schnell`);
    `model_prefix` is the prefix the family's keys were found under."""

    family: str
    variant: str
    ema: bool
    prediction: str | None
    prefixes: tuple[str, ...]
    prediction_source: str | None = None
    zero_terminal_snr: bool = False
    kind: str | None = None
    model_prefix: str = ""

    def describe_prediction(self) -> str | None:
        """e.g. `v (v_pred marker), zero terminal SNR (ztsnr marker)`; None if unknown."""
        parts = []
        if self.prediction is not None:
            parts.append(f"{self.prediction} ({self.prediction_source})")
        if self.zero_terminal_snr:
            parts.append(f"zero terminal SNR ({ZERO_TERMINAL_SNR_MARKER} marker)")
        return ", ".join(parts) or None

    def describe(self) -> str:
        """e.g. `sd1 inpainting` or `unknown (keys under: a., b.)`."""
        if self.family == UNKNOWN:
            return f"unknown (keys under: {', '.join(self.prefixes)})"
        name = self.family if self.kind is None else f"{self.family} {self.kind}"
        return name if self.variant == "normal" else f"{name} {self.variant}"

    @property
    def modelspec(self) -> str | None:
        """The SAI model spec architecture name, where one is defined."""
        data = known(self.family)
        if data is None:
            return None
        if self.prediction == "v" and data.modelspec_v_prediction:
            return data.modelspec_v_prediction
        kind = next((k for k in data.kinds if k.name == self.kind), None)
        return kind.modelspec if kind and kind.modelspec else data.modelspec


def key_prefixes(keys: object) -> tuple[str, ...]:
    """The distinct first two dotted parts of the keys, e.g. `model.diffusion_model.`."""
    return tuple(sorted({".".join(key.split(".")[:2]) + "." for key in keys}))  # type: ignore[attr-defined]


def detect(infos: Mapping[str, TensorInfo], metadata: Mapping[str, str]) -> Architecture:
    """Detect the architecture from key names, shapes and metadata."""
    name, prefix = _family(infos)
    data = known(name)
    variant = UNKNOWN
    kind = None
    if data is not None:
        table = data.variants
        model_keys = any(key.startswith(prefix) for key in infos) if prefix else True
        conv_in = infos.get(prefix + table.key) if table else None
        if table is None or not model_keys:
            variant = "normal"  # no layer tells the variants apart: nothing says otherwise
        elif conv_in is not None and len(conv_in.shape) == table.ndim:
            variant = table.values.get(conv_in.shape[table.dim], UNKNOWN)
        kind = next(
            (k.name for k in data.kinds if all(prefix + key in infos for key in k.has)), None
        )
    # The marker wins over metadata: it is what A1111 and ComfyUI sample by.
    source = next((k for k in PREDICTION_METADATA_KEYS if k in metadata), None)
    prediction = metadata[source] if source is not None else None
    if V_PREDICTION_MARKER in infos:
        prediction, source = "v", f"{V_PREDICTION_MARKER} marker"
    return Architecture(
        family=name,
        variant=variant,
        ema=any(key.startswith("model_ema.") for key in infos),
        prediction=prediction,
        prefixes=key_prefixes(infos),
        prediction_source=source,
        zero_terminal_snr=ZERO_TERMINAL_SNR_MARKER in infos,
        kind=kind,
        model_prefix=prefix,
    )


def _family(infos: Mapping[str, TensorInfo]) -> tuple[str, str]:
    """The first family whose signature holds, and the prefix its keys are under."""
    for signature, name in signatures():
        for prefix in signature.within:
            if _holds(signature, prefix, infos):
                data = known(name)
                model_prefix = data.model_prefix if data and data.model_prefix else prefix
                if prefix == "" and signature.within != ("",):
                    model_prefix = ""
                return name, model_prefix
    return UNKNOWN, ""


def _holds(signature: Signature, prefix: str, infos: Mapping[str, TensorInfo]) -> bool:
    if not all(prefix + key in infos for key in signature.has):
        return False
    if any(prefix + key in infos for key in signature.lacks):
        return False
    for wanted in signature.has_prefix:
        if not any(key.startswith(prefix + wanted) for key in infos):
            return False
    for unwanted in signature.lacks_prefix:
        if any(key.startswith(prefix + unwanted) for key in infos):
            return False
    rule = signature.first_with_suffix
    if rule is not None:
        first = next((info for key, info in infos.items() if key.endswith(rule.suffix)), None)
        if first is None or len(first.shape) != rule.ndim:
            return False
    return True
