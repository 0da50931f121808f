"""What a build must do for each node and output, and why.

Each node is *up to date* (its output file, or for an intermediate its cache
entries, are current), *from cache* (its tensors need no computation), or
*rebuild*, with a reason found by comparing with the lock file, such as
`alpha changed 0.3 -> 0.4` or `input B content changed`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import networkx as nx

from sdrecipe.plan.cache_policy import cache_choice
from sdrecipe.plan.graph import device_dependent
from sdrecipe.plan.identity import Identities
from sdrecipe.plan.status import MATCHES_LOCK, NodeStatus, OutputFacts, Status, output_status
from sdrecipe.plan.tensor_plan import BuildPlan, Compute
from sdrecipe.recipe.expr import (
    BinOp,
    Call,
    Expr,
    ExpressionError,
    Neg,
    Num,
    ParamValue,
    PerKey,
    Ref,
    format_value,
    parse_expression,
)
from sdrecipe.recipe.lock import Lock
from sdrecipe.recipe.per_key import DEFAULT, KeyContext, resolve


def node_statuses(
    plan: BuildPlan,
    identities: Identities,
    lock: Lock | None,
    input_sha256: Mapping[str, str],
    cached: set[str],
    outputs: Mapping[str, OutputFacts],
    force: bool,
) -> list[NodeStatus]:
    """The status and reason of every node the selected outputs need, in order."""
    graph = plan.graph
    computed = _computed_identities(plan, identities)
    output_of = {graph.recipe.outputs[name].node: name for name in graph.outputs}
    statuses: dict[str, NodeStatus] = {}
    for node in reversed(graph.order):
        output = output_of.get(node)
        consumers = [statuses[c] for c in graph.dag.successors(node) if c in statuses]
        needed = output is not None or any(s.status == Status.REBUILD for s in consumers)
        own = computed[node] if output is None else computed[f"output:{output}"]
        all_cached = own <= cached
        status = output_status(outputs[output], all_cached, force) if output is not None else None
        if force and needed:
            status, reason = Status.REBUILD, "forced (--force)"
        elif status == Status.UP_TO_DATE:
            reason = MATCHES_LOCK
        elif status == Status.FROM_CACHE:
            reason = _output_reason(plan, node, lock, input_sha256, identities, outputs[output])
        elif not needed:
            status, reason = (
                (Status.UP_TO_DATE, "cached") if all_cached else (Status.NOT_NEEDED, "")
            )
        elif all_cached:
            status, reason = Status.FROM_CACHE, "cached"
        elif output is None and not cache_choice(graph, node).store:
            status, reason = Status.REBUILD, "recomputed"  # `caching` says why
        else:
            status = Status.REBUILD
            reason = _change_reason(plan, node, lock, input_sha256, identities)
            if own & cached:
                reason += f" ({len(own & cached)} of {len(own)} tensors cached)"
        caching = "" if output is not None else cache_choice(graph, node).describe()
        statuses[node] = NodeStatus(node, status, reason, output, caching)
    return [statuses[node] for node in graph.order]


def _computed_identities(plan: BuildPlan, identities: Identities) -> dict[str, set[str]]:
    """For each node the identities of the tensors it computes, and for each
    output (`output:NAME`) those of its tensors that are not input copies."""
    graph = plan.graph
    result: dict[str, set[str]] = {node: set() for node in graph.order}
    result.update({f"output:{name}": set() for name in graph.outputs})
    for key_plan in plan.keys:
        for node, step in key_plan.steps.items():
            if isinstance(step, Compute):
                result[node].add(identities.values[node][key_plan.key])
        for name in key_plan.computed_outputs:
            result[f"output:{name}"].add(identities.outputs[name][key_plan.key])
    return result


def _output_reason(
    plan: BuildPlan,
    node: str,
    lock: Lock | None,
    input_sha256: Mapping[str, str],
    identities: Identities,
    facts: OutputFacts,
) -> str:
    if not facts.exists:
        return "output missing"
    locked = lock.nodes.get(node) if lock is not None else None
    if locked is not None and locked.identity == identities.node_id(node):
        return "output differs from the lock (changed on disk, or how it is written changed)"
    return _change_reason(plan, node, lock, input_sha256, identities)


def _change_reason(
    plan: BuildPlan,
    node: str,
    lock: Lock | None,
    input_sha256: Mapping[str, str],
    identities: Identities,
) -> str:
    """Why `node`'s tensors differ from the last build recorded in the lock."""
    graph = plan.graph
    if lock is None:
        return "first build (no lock file)"
    locked = lock.nodes.get(node)
    if locked is None:
        return "new node"
    reasons = []
    signature = graph.recipe.nodes[node].signature
    if locked.expression != signature:
        contexts = plan.contexts(node)

        def keys_changed(before: ParamValue, after: ParamValue) -> int:
            return sum(_value_at(before, c) != _value_at(after, c) for c in contexts)

        reasons.append(describe_expression_change(locked.expression, signature, keys_changed))
    for operand in graph.operands(node):
        if operand in graph.recipe.inputs:
            before = lock.inputs.get(operand)
            if before is None or before.sha256 != input_sha256[operand]:
                reasons.append(f"input {operand} content changed")
        else:
            before_node = lock.nodes.get(operand)
            if before_node is None or before_node.identity != identities.node_id(operand):
                reasons.append(f"node {operand} changed")
    if reasons:
        return ", ".join(reasons)
    if locked.identity == identities.node_id(node):
        return "not in cache"
    if device_dependent(graph.recipe.nodes[node].expr):
        # The classes the lock's outputs of this node, or built from it, were built on.
        downstream = nx.descendants(graph.dag, node) | {node}
        built = {
            lock.outputs[name].device
            for name, output in graph.recipe.outputs.items()
            if output.node in downstream and name in lock.outputs
        } - {None}
        why = "its methods' bytes follow it; see --device"
        if not built:
            return f"built on another device class: {why}"
        if built != {identities.device_class}:
            classes = ", ".join(sorted(map(str, built)))
            here = identities.device_class
            return f"built on another device class ({classes}; this run computes on {here}): {why}"
    return "sdrecipe's arithmetic changed"


KeysChanged = Callable[[ParamValue, ParamValue], int]


def describe_expression_change(
    before: str, after: str, keys_changed: KeysChanged | None = None
) -> str:
    """`alpha changed 0.3 -> 0.4` where only numbers differ, else the two expressions.

    A per-key parameter's change names the labels that changed and, given
    `keys_changed`, how many keys get another value:
    `alpha for text_encoder changed 0.2 -> 0.3 (196 keys)`."""
    try:
        changes = _number_changes(parse_expression(before), parse_expression(after), keys_changed)
    except ExpressionError:
        changes = None
    if not changes:
        return f"expression changed {before!r} -> {after!r}"
    return ", ".join(changes)


def _number_changes(
    before: Expr, after: Expr, keys_changed: KeysChanged | None
) -> list[str] | None:
    """Parameter and factor changes between two same-shaped expressions, else None."""
    if type(before) is not type(after):
        return None
    if isinstance(before, Ref):
        return [] if before == after else None
    if isinstance(before, Num):
        return [] if before == after else [f"factor changed {before.value:g} -> {after.value:g}"]  # type: ignore[union-attr]
    if isinstance(before, Neg):
        return _number_changes(before.operand, after.operand, keys_changed)  # type: ignore[union-attr]
    if isinstance(before, BinOp):
        assert isinstance(after, BinOp)
        if before.op != after.op:
            return None
        left = _number_changes(before.left, after.left, keys_changed)
        right = _number_changes(before.right, after.right, keys_changed)
        return None if left is None or right is None else left + right
    assert isinstance(before, Call) and isinstance(after, Call)
    if before.method != after.method or len(before.args) != len(after.args):
        return None
    changes: list[str] = []
    for old, new in zip(before.args, after.args, strict=True):
        sub = _number_changes(old, new, keys_changed)
        if sub is None:
            return None
        changes += sub
    old_params, new_params = dict(before.params), dict(after.params)
    for name in sorted(old_params.keys() | new_params.keys()):
        old_value, new_value = old_params.get(name), new_params.get(name)
        if old_value == new_value:
            continue
        if isinstance(old_value, PerKey) or isinstance(new_value, PerKey):
            text = _per_key_change(name, old_value, new_value)
            if keys_changed is not None and old_value is not None and new_value is not None:
                text += f" ({keys_changed(old_value, new_value)} keys)"
            changes.append(text)
        else:
            changes.append(f"{name} changed {_show(old_value)} -> {_show(new_value)}")
    return changes


def _per_key_change(name: str, before: ParamValue | None, after: ParamValue | None) -> str:
    """`alpha for text_encoder changed 0.2 -> 0.3, for unet ...`, label by label."""
    old, new = _labelled(before), _labelled(after)
    parts = [
        f"for {label} {_show(old.get(label))} -> {_show(new.get(label))}"
        for label in dict.fromkeys([*new, *old])
        if old.get(label) != new.get(label)
    ]
    return f"{name} changed " + ", ".join(parts)


def _labelled(value: ParamValue | None) -> dict[str, ParamValue]:
    if value is None:
        return {}
    return dict(value.entries) if isinstance(value, PerKey) else {DEFAULT: value}


def _value_at(value: ParamValue, context: KeyContext) -> ParamValue:
    return resolve(value, context) if isinstance(value, PerKey) else value


def _show(value: ParamValue | None) -> str:
    if value is None:
        return "default"
    if isinstance(value, float | int) and not isinstance(value, bool):
        return f"{value:g}"
    return format_value(value)
