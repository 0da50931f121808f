"""The identity of every tensor a build reads or produces.

Glossary:
- *key*: a tensor's name in a checkpoint (`model.diffusion_model.out.2.weight`).
  Nothing else is called a key.
- *digest*: the blake3 hash of a tensor's dtype, shape and bytes.
- *identity*: what a tensor's value is made from, hashed; equal identities
  mean equal bytes, so the cache is looked up by identity.
- *node id* / *output id*: one hash of all of a node's (output's) identities;
  the lock file records them in its `identity:` fields (`key:` before lock
  format 3, still read).

Rules:
- An input tensor's identity is its content digest.
- A node that passes a key through has its base's identity there.
- A node that computes a key has H(expression with this key's parameter values
  and operands by position, channel rule, compute dtype, operand identities,
  and the key itself for key-aware methods), so renaming an input changes
  nothing and any change of method, parameter or input content does.
- A written output tensor is its source's (node or baked VAE) plus the output dtype.
- A build on a device (`--device cuda`, `mps`) adds the device class to a computed
  key whose expression calls a method with bytes of its own on each device
  (`MergeMethod.device` is OWN_BYTES), and to a LoRA output's tensors (its
  factors come from the device's SVD), so a CPU cache entry never stands for
  them; every other identity is the same on every device.

An output's id also covers the output file's metadata, so it names the exact
bytes that will be written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import blake3

from sdrecipe import OUTPUT_FORMAT
from sdrecipe.io.dtypes import DTYPE_TO_CODE
from sdrecipe.methods.registry import CPU
from sdrecipe.plan.graph import device_dependent
from sdrecipe.plan.tensor_plan import BuildPlan, Compute
from sdrecipe.recipe.expr import Expr, format_expression, rename_references

IDENTITY_VERSION = f"sdrecipe-identity-{OUTPUT_FORMAT}"
# Part of every output id: cached outputs (packs, local and remote) are named by
# content digest, and an id must not find a pack named the older way, by sha256.
PACK_NAMING = "content-digest"


def _hash(*parts: object) -> str:
    return blake3.blake3(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class Identities:
    """Per-key identities of every input, node and output in a plan."""

    values: dict[str, dict[str, str]]
    outputs: dict[str, dict[str, str]]
    device_class: str = CPU  # the build's, which device-dependent methods' identities carry

    def every(self) -> set[str]:
        """Every tensor identity of the plan's nodes and outputs."""
        found: set[str] = set()
        for values in (*self.values.values(), *self.outputs.values()):
            found.update(values.values())
        return found

    def node_id(self, node: str) -> str:
        """One hash of all of `node`'s tensor identities."""
        return _hash(IDENTITY_VERSION, sorted(self.values[node].items()))

    def output_id(
        self, output: str, metadata: Mapping[str, str], written_as: Mapping[str, str]
    ) -> str:
        """One hash of an output's exact content: metadata, tensors, and how it is
        written (format, and any files copied in)."""
        return _hash(
            IDENTITY_VERSION,
            PACK_NAMING,
            dict(metadata),
            dict(written_as),
            sorted(self.outputs[output].items()),
        )


def tensor_identities(
    plan: BuildPlan, digests: Mapping[str, Mapping[str, str]], device_class: str = CPU
) -> Identities:
    """Identities from the plan and each input's per-tensor digests, for a build
    on `device_class`."""
    graph = plan.graph
    values: dict[str, dict[str, str]] = {name: dict(digests[name]) for name in digests}
    positions = {
        node: {name: f"${index}" for index, name in enumerate(graph.operands(node))}
        for node in graph.order
    }
    templates: dict[tuple[str, Expr], str] = {}
    for node in graph.order:
        values[node] = {}
    for key_plan in plan.keys:
        key = key_plan.key
        for node, step in key_plan.steps.items():
            operands = graph.operands(node)
            if isinstance(step, Compute):
                # The expression with this key's parameter values, operands by position.
                template = templates.get((node, step.expr))
                if template is None:
                    template = format_expression(rename_references(step.expr, positions[node]))
                    templates[(node, step.expr)] = template
                parts = [
                    IDENTITY_VERSION,
                    template,
                    step.channels,
                    DTYPE_TO_CODE[step.dtype],
                    [None if o in step.absent else values[o][key] for o in operands],
                ]
                if step.context is not None:
                    parts.append(key)  # a key-aware method: each key's result is its own
                if device_class != CPU and device_dependent(step.expr):
                    parts.append(f"device:{device_class}")
                values[node][key] = _hash(*parts)
            else:
                values[node][key] = values[operands[0]][key]
    outputs: dict[str, dict[str, str]] = {name: {} for name in plan.outputs}
    for key_plan in plan.keys:
        key = key_plan.key
        for name, source in key_plan.sources.items():
            output_plan = plan.outputs[name]
            stored = DTYPE_TO_CODE[output_plan.tensors[key].dtype]
            encoding = output_plan.encodings.get(key)
            stored = stored if encoding is None else f"{stored} {encoding!r}"
            if output_plan.output.lora is not None and device_class != CPU:
                stored += f" device:{device_class}"  # factors from the device's SVD
            outputs[name][key] = _hash(values[source][key], stored)
    return Identities(values=values, outputs=outputs, device_class=device_class)
