"""Per-tensor build plan, made from file headers before any tensor data is read.

For every key the plan says, node by node, whether the node computes the key or
passes its base's value through (and why), applies the inpainting /
instruct-pix2pix channel rule, and rejects every shape mismatch up front. What
each output file holds (dtypes, a baked VAE, a GGUF's tensors, encodings) is
decided in `sdrecipe.plan.output_files`.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from sdrecipe.arch import (
    COMPONENTS,
    PREDICTION_MARKERS,
    family_components,
    never_merged_reason,
)
from sdrecipe.arch.blocks import block_values_taken, listed_block_ids
from sdrecipe.errors import RecipeError
from sdrecipe.io.dtypes import DTYPE_TO_CODE
from sdrecipe.io.encodings import Encoding, ScaledFp8
from sdrecipe.io.safetensors_writer import layout_order
from sdrecipe.io.tensor_info import TensorInfo
from sdrecipe.methods import get_method
from sdrecipe.methods.registry import DIFFERENCE
from sdrecipe.plan.graph import MergeGraph
from sdrecipe.plan.output_files import OutputFiles
from sdrecipe.recipe import Output
from sdrecipe.recipe.expr import Call, Expr, PerKey, method_calls, walk
from sdrecipe.recipe.per_key import KeyContext, for_key, key_context, unknown_blocks

MERGED = "merged"


@dataclass(frozen=True)
class Passthrough:
    """The node's value at this key is its base's value, unchanged."""

    reason: str


@dataclass(frozen=True)
class Compute:
    """The node evaluates its expression at this key.

    `channels` is set when the base has more dim-1 channels than another operand
    (inpainting / instruct-pix2pix): the expression is evaluated on the leading
    `channels` channels and the base keeps its extra channels. `dtype` is the
    compute dtype: float64 if any operand is float64, else float32. `expr` is
    the node's expression with its per-key parameters resolved for this key;
    `context` is set when a key-aware method needs the key. `absent` names the
    difference operands that hold nothing at this key (an adapter that does
    not patch it): they count as zero.
    """

    expr: Expr
    dtype: torch.dtype = torch.float32
    channels: int | None = None
    context: KeyContext | None = None
    absent: frozenset[str] = frozenset()


Step = Passthrough | Compute


@dataclass(frozen=True)
class KeyPlan:
    """How one tensor key is produced.

    `steps` holds the decision of every node that has the key, in evaluation
    order. `sources` maps each output that holds the key to the node or input
    whose value it writes (its node, or its baked VAE). `copies` maps outputs
    that take an input's bytes unchanged to that input; `computed_outputs`
    need node values or a dtype conversion. `rows` is dim 0 when every
    tensor that could be involved shares it (work may then go in row ranges),
    and `row_width` the most elements in one row of any of them; both depend on
    shapes only, so results never depend on what was cached.
    """

    key: str
    steps: dict[str, Step]
    sources: dict[str, str]
    copies: dict[str, str]
    computed_outputs: tuple[str, ...]
    rows: int | None
    row_width: int


@dataclass(frozen=True)
class OutputPlan:
    """The tensors one output file will hold, and how each key came to be.

    `encodings` names the keys stored otherwise than as their dtype's values
    (scaled fp8, GGUF blocks: see `sdrecipe.io.encodings`); `constants` holds
    tensors whose bytes the plan fixes (the scaled-fp8 marker)."""

    name: str
    output: Output
    tensors: dict[str, TensorInfo]
    status: dict[str, str]
    dropped: int
    encodings: Mapping[str, Encoding] = field(default_factory=dict)
    constants: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def counts(self) -> Counter[str]:
        """How many keys were merged, and passed through for each reason."""
        return Counter(self.status.values())


@dataclass(frozen=True)
class BuildPlan:
    """Everything the executor needs; computed from headers only."""

    graph: MergeGraph
    keys: tuple[KeyPlan, ...]
    outputs: dict[str, OutputPlan]
    input_infos: dict[str, dict[str, TensorInfo]] = field(repr=False)
    warnings: tuple[str, ...] = ()
    families: Mapping[str, str] = field(default_factory=dict)

    def contexts(self, node: str) -> list[KeyContext]:
        """The context of every key `node` computes."""
        family = self.families.get(self.graph.base_input(node), "unknown")
        return [
            key_context(key_plan.key, family)
            for key_plan in self.keys
            if isinstance(key_plan.steps.get(node), Compute)
        ]


def make_plan(
    graph: MergeGraph,
    input_infos: dict[str, dict[str, TensorInfo]],
    families: Mapping[str, str] | None = None,
) -> BuildPlan:
    """Decide every key of every selected output; raise RecipeError on shape conflicts.

    `families` (per input) tell which block table a key's context uses."""
    planner = _Planner(graph, input_infos, families or {})
    tensors = {name: planner.files.tensors(name) for name in graph.outputs}
    # Keys go in the first output's file layout; other outputs' keys follow.
    order: dict[str, None] = {}
    for output_tensors in tensors.values():
        order.update(dict.fromkeys(layout_order(output_tensors)))
    keys = tuple(planner.plan_key(key) for key in order)
    planner.raise_conflicts()
    outputs = {name: planner.output_plan(name, tensors[name]) for name in graph.outputs}
    warnings = planner.empty_selections() + planner.markers_not_kept()
    return BuildPlan(
        graph=graph,
        keys=keys,
        outputs=outputs,
        input_infos=input_infos,
        warnings=warnings + tuple(planner.files.notes),
        families=dict(families or {}),
    )


class _Planner:
    def __init__(
        self,
        graph: MergeGraph,
        input_infos: dict[str, dict[str, TensorInfo]],
        families: Mapping[str, str],
    ):
        self.graph = graph
        self.input_infos = input_infos
        self.families = families
        self.key_aware = {
            node: any(
                get_method(name).key_aware for name in method_calls(graph.recipe.nodes[node].expr)
            )
            for node in graph.order
        }
        for node in graph.order:
            self.check_blocks(node)
            self.check_components(node)
        self.status: dict[str, dict[str, str]] = {node: {} for node in graph.order}
        self.value_dtypes: dict[str, torch.dtype] = {}
        self.elementwise = {
            node: all(
                get_method(name).elementwise for name in method_calls(graph.recipe.nodes[node].expr)
            )
            for node in graph.order
        }
        self.conflicts: list[tuple[str, str]] = []
        self.shared_steps: dict[tuple[str, torch.dtype, frozenset[str]], Compute] = {}
        self.selecting: set[str] = set()
        self.files = OutputFiles(graph, input_infos, families)

    def check_blocks(self, node: str) -> None:
        """Refuse block labels that the family of the node's base has no block for."""
        family = self.families.get(self.graph.base_input(node), "unknown")
        spec = self.graph.recipe.nodes[node]
        for call in (n for n in walk(spec.expr) if isinstance(n, Call)):
            for name, value in call.params:
                unknown = unknown_blocks(value, family) if isinstance(value, PerKey) else []
                if unknown and value.source:
                    raise RecipeError(
                        f"node {node!r}: {call.method}() parameter {name!r} is {value.source}, "
                        f"and its base model is {family}, which takes {block_values_taken(family)}",
                        self.graph.recipe.path,
                        spec.line,
                    )
                if unknown:
                    ids = listed_block_ids(family)
                    known = (
                        f"its {len(ids)} blocks are {', '.join(ids)} (a list has {len(ids)} values)"
                        if ids
                        else "it has no block table"
                    )
                    raise RecipeError(
                        f"node {node!r}: {call.method}() parameter {name!r} names "
                        f"{', '.join(unknown)}, which {family} has no block for; {known}",
                        self.graph.recipe.path,
                        spec.line,
                    )

    def check_components(self, node: str) -> None:
        """Refuse components (in `only`, `exclude` or a per-key mapping) that the
        family of the node's base does not have: `unet` selects nothing of Flux.1."""
        family = self.families.get(self.graph.base_input(node), "unknown")
        has = family_components(family)
        if has is None:
            return
        spec = self.graph.recipe.nodes[node]
        named = set(spec.selection.only | spec.selection.exclude)
        for call in (n for n in walk(spec.expr) if isinstance(n, Call)):
            for _, value in call.params:
                if isinstance(value, PerKey):
                    named.update(label for label, _ in value.entries if label in COMPONENTS)
        foreign = sorted(named - has)
        if foreign:
            raise RecipeError(
                f"node {node!r} names the component(s) {', '.join(foreign)}, which its base "
                f"model's family, {family}, does not have; its components are "
                f"{', '.join(sorted(has))}",
                self.graph.recipe.path,
                spec.line,
            )

    def empty_selections(self) -> tuple[str, ...]:
        """A warning for each node whose key selection matched no key."""
        nodes = self.graph.recipe.nodes
        return tuple(
            f"node {node!r}: its selection ({nodes[node].selection.describe()}) matches no "
            "key, so it merges nothing and passes its base through"
            for node in self.graph.order
            if nodes[node].selection.describe() and node not in self.selecting
        )

    def markers_not_kept(self) -> tuple[str, ...]:
        """A warning for each output whose base lacks a prediction marker
        (`v_pred`, `ztsnr`) that another of its inputs carries: the output keeps
        its base's keys, so it goes without, and UIs sample it as they would the base."""
        recipe = self.graph.recipe
        warnings = []
        for name in self.graph.outputs:
            node = recipe.outputs[name].node
            spec = recipe.nodes.get(node)
            if recipe.outputs[name].lora is not None or (spec and spec.space == DIFFERENCE):
                continue  # a file of differences is no model to sample
            base = self.graph.base_input(node)
            lacking = [key for key in PREDICTION_MARKERS if key not in self.input_infos[base]]
            carriers = {
                leaf: [key for key in lacking if key in self.input_infos[leaf]]
                for leaf in self.graph.inputs_of(node)
            }
            carriers = {leaf: keys for leaf, keys in carriers.items() if keys}
            if not carriers:
                continue
            markers = [key for key in lacking if any(key in keys for keys in carriers.values())]
            described = ", ".join(f"{key} ({PREDICTION_MARKERS[key]})" for key in markers)
            first = next(iter(carriers))
            warnings.append(
                f"output {name!r}: {', '.join(carriers)} carr{'y' if len(carriers) > 1 else 'ies'} "
                f"{described} and its base {base} does not; the output keeps its base's keys, "
                f"so it will carry no such marker and UIs will sample it as they sample {base}. "
                f"Put {first} first to make it sample as {first} does"
            )
        return tuple(warnings)

    def value_dtype(self, name: str, key: str) -> torch.dtype:
        """The dtype of `name`'s value at the key being planned (computed nodes: compute dtype)."""
        if name in self.input_infos:
            return self.input_infos[name][key].dtype
        return self.value_dtypes[name]

    def info(self, name: str, key: str) -> TensorInfo | None:
        """The value `name` has at `key`: its base input's dtype and shape, or None."""
        return self.input_infos[self.graph.base_input(name)].get(key)

    def holds_no_difference(self, name: str, key: str) -> bool:
        """True for a difference that is zero at `key`: an adapter that does not
        patch it, or a difference node that did not compute it."""
        recipe = self.graph.recipe
        if name in recipe.inputs:
            return recipe.inputs[name].space == DIFFERENCE and key not in self.input_infos[name]
        return recipe.nodes[name].space == DIFFERENCE and self.status[name].get(key) != MERGED

    def decide(self, node: str, key: str) -> Step:
        operands = self.graph.operands(node)
        base = self.info(operands[0], key)
        assert base is not None
        family = self.families.get(self.graph.base_input(node), "unknown")
        if not self.graph.recipe.nodes[node].selection.selects(key, family):
            return Passthrough("outside the node's selection")
        self.selecting.add(node)
        never_merged = never_merged_reason(key)
        if never_merged:
            return Passthrough(f"never merged ({never_merged})")
        if not base.is_floating:
            return Passthrough(f"not floating point ({DTYPE_TO_CODE[base.dtype]})")
        infos = [base]
        absent = []
        for operand in operands[1:]:
            info = self.info(operand, key)
            if self.holds_no_difference(operand, key):
                absent.append(operand)
                continue
            if info is None:
                return Passthrough(f"missing from {operand}")
            if not info.is_floating:
                return Passthrough(f"not floating point in {operand}")
            infos.append(info)
        if absent and len(absent) == len(operands) - 1:
            return Passthrough(f"missing from {', '.join(absent)}")
        dtypes = {self.value_dtype(o, key) for o in operands if o not in absent}
        dtype = torch.float64 if torch.float64 in dtypes else torch.float32
        context = key_context(key, family)
        expr = for_key(self.graph.recipe.nodes[node].expr, context)
        compute = Compute(
            expr, dtype, context=context if self.key_aware[node] else None, absent=frozenset(absent)
        )
        if expr is self.graph.recipe.nodes[node].expr and compute.context is None:
            # The same step at most keys: one object (a sweep plans a million steps).
            compute = self.shared_steps.setdefault((node, dtype, compute.absent), compute)
        shapes = [info.shape for info in infos]
        present = [operand for operand in operands if operand not in absent]
        if all(shape == base.shape for shape in shapes):
            return compute
        if _differ_only_in_channels(shapes):
            widest = max(shape[1] for shape in shapes)
            narrowest = min(shape[1] for shape in shapes)
            wide_others = [
                (operand, shape[1])
                for operand, shape in zip(present[1:], shapes[1:], strict=True)
                if shape[1] > narrowest
            ]
            if base.shape[1] == widest and not wide_others:
                return dataclasses.replace(compute, channels=narrowest)
            if base.shape[1] == widest:
                other, width = wide_others[0]
                self.conflicts.append(
                    (
                        node,
                        f"{key}: {other} has {width} input channels and another operand "
                        f"{narrowest}; the merge takes the first {narrowest} of each, so "
                        f"{other}'s other {width - narrowest} would be dropped: only the base "
                        "may have more input channels than the others",
                    )
                )
                return Passthrough("shape conflict")
            other = present[next(i for i, s in enumerate(shapes) if s[1] == widest)]
            self.conflicts.append(
                (
                    node,
                    f"{key}: {other} has {widest} input channels and the base "
                    f"{operands[0]} only {base.shape[1]}; the inpainting / instruct-pix2pix / "
                    "Fill model must be the first (base) model",
                )
            )
        else:
            described = ", ".join(
                f"{name} {list(shape)}" for name, shape in zip(present, shapes, strict=True)
            )
            self.conflicts.append((node, f"{key}: shapes differ: {described}"))
        return Passthrough("shape conflict")

    def plan_key(self, key: str) -> KeyPlan:
        graph = self.graph
        recipe = graph.recipe
        steps: dict[str, Step] = {}
        for node in graph.order:
            if self.info(node, key) is None:
                continue
            step = steps[node] = self.decide(node, key)
            base = graph.base(node)
            self.value_dtypes[node] = (
                step.dtype if isinstance(step, Compute) else self.value_dtype(base, key)
            )
            if isinstance(step, Compute) or self.status.get(base, {}).get(key) == MERGED:
                self.status[node][key] = MERGED
            else:
                self.status[node][key] = step.reason  # type: ignore[union-attr]
        sources: dict[str, str] = {}
        copies: dict[str, str] = {}
        computed: list[str] = []
        for name in graph.outputs:
            if key not in self.files.written[name]:
                continue  # pruned, or only in another output's inputs
            output = recipe.outputs[name]
            if output.lora is not None and self.status[output.node].get(key) != MERGED:
                continue  # no difference here: the LoRA has no layer for it
            vae = output.vae if key in self.files.baked.get(name, ()) else None
            source = sources[name] = vae or output.node
            copied = self._copy_source(name, source, key, steps)
            if copied is None:
                computed.append(name)
            else:
                copies[name] = copied
        return KeyPlan(
            key=key,
            steps=steps,
            sources=sources,
            copies=copies,
            computed_outputs=tuple(computed),
            **self._shared_rows(key, set(steps), set(sources.values())),
        )

    def _copy_source(self, output: str, name: str, key: str, steps: dict[str, Step]) -> str | None:
        """The input whose bytes the output can take from `name` as they are, if any:
        nothing on the way computes, and the dtype is the one the output holds
        (and no encoding of the output's stores it otherwise)."""
        if key in self.files.encodings.get(output, {}):
            return None
        while name in steps:
            if isinstance(steps[name], Compute):
                return None
            name = self.graph.base(name)
        info = self.info(name, key)
        assert info is not None
        return name if info.dtype == self.files.written[output][key].dtype else None

    def _shared_rows(self, key: str, nodes: set[str], sources: set[str]) -> dict[str, int | None]:
        """Dim 0 when every tensor that may be involved has it and every method
        involved is element-wise (work may then go in row ranges), and the most
        elements in one row of any of them."""
        names = {self.graph.base_input(name) for name in nodes | sources}
        for node in nodes:
            names.update(
                operand
                for operand in self.graph.operands(node)
                if operand in self.input_infos and key in self.input_infos[operand]
            )
        infos = [self.input_infos[name][key] for name in names]
        rows = {info.shape[0] if info.shape else None for info in infos}
        shared = rows.pop() if len(rows) == 1 else None
        if not all(self.elementwise[node] for node in nodes):
            shared = None
        width = max(info.numel // shared if shared else info.numel for info in infos)
        return {"rows": shared, "row_width": width}

    def raise_conflicts(self) -> None:
        if not self.conflicts:
            return
        recipe = self.graph.recipe
        node = self.conflicts[0][0]
        shown = "; ".join(message for _, message in self.conflicts[:3])
        more = len(self.conflicts) - 3
        suffix = f"; and {more} more" if more > 0 else ""
        raise RecipeError(
            f"node {node!r}: {len(self.conflicts)} tensor(s) cannot be merged: {shown}{suffix}",
            recipe.path,
            recipe.nodes[node].line,
        )

    def output_plan(self, name: str, tensors: dict[str, TensorInfo]) -> OutputPlan:
        graph = self.graph
        output = graph.recipe.outputs[name]
        others = set()
        for leaf in graph.inputs_of(output.node):
            others.update(self.input_infos[leaf])
        status = dict(self.status[output.node])
        status.update(dict.fromkeys(self.files.baked.get(name, ()), "from the baked VAE"))
        if output.lora is not None:
            tensors = {key: info for key, info in tensors.items() if status.get(key) == MERGED}
        encodings = self.files.encodings.get(name, {})
        constants = self.files.constants.get(name, {})
        companions = {
            e.scale_key: TensorInfo(torch.float32, ())
            for e in encodings.values()
            if isinstance(e, ScaledFp8)
        }
        constant_infos = {key: TensorInfo(t.dtype, tuple(t.shape)) for key, t in constants.items()}
        return OutputPlan(
            name=name,
            output=output,
            tensors={**tensors, **companions, **constant_infos},
            status=status,
            dropped=0 if output.lora is not None else len(others - set(tensors)),
            encodings=encodings,
            constants=constants,
        )


def _differ_only_in_channels(shapes: list[tuple[int, ...]]) -> bool:
    first = shapes[0]
    return len(first) >= 2 and all(
        len(shape) == len(first) and shape[:1] == first[:1] and shape[2:] == first[2:]
        for shape in shapes
    )
