"""Check UI-format ComfyUI workflows against a running server's /object_info, and convert them to API format.

    python scripts/validate_workflow.py --server http://127.0.0.1:8188 workflows/*.json

What a workflow must satisfy (what the server's own validation and the frontend would reject):
- every node type exists on the server (frontend-only Note and MarkdownNote nodes are known here);
- widget values match each node's widget inputs: their count (an INT input with a
  control-after-generate widget, explicit or named seed / noise_seed as the frontend does, carries one
  more value: fixed / increment / decrement / randomize), combo membership, numeric type and min/max,
  booleans and strings;
- every required input is linked or has a widget value; linked inputs exist on the node;
- links are well formed (ids, slots, the node's own input and output records agree) and connect
  compatible types (ComfyUI's rule: equal, "*", or comma-separated unions that overlap).

Library use (stdlib only, no ComfyUI needed):
    info = fetch_object_info("http://127.0.0.1:8188")
    problems = validate_workflow(workflow_dict, info)          # [] when valid
    prompt = ui_to_api(workflow_dict, info)                     # {id: {"class_type", "inputs"}} for POST /prompt
    problems = validate_prompt(prompt, info)                    # the same checks on an API-format graph
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import urllib.request

FRONTEND_ONLY = {"Note", "MarkdownNote"}  # drawn by the frontend only; never sent to the server
# Frontend-only nodes that pass values or links on; the frontend resolves them when it queues a graph. Not handled here.
FRONTEND_VIRTUAL = {"Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
CONTROL_NAMES = ("seed", "noise_seed")


def fetch_object_info(server: str, timeout: float = 30) -> dict:
    """GET <server>/object_info (e.g. server = "http://127.0.0.1:8188")."""
    with urllib.request.urlopen(server.rstrip("/") + "/object_info", timeout=timeout) as r:
        return json.loads(r.read())


# --- a node's inputs, as the server describes them ----------------------------------------------------

def _options(entry) -> dict:
    return entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}


def combo_options(entry):
    """The allowed values of a combo input spec, or None if the input is not a combo."""
    kind = entry[0]
    if isinstance(kind, list):
        return kind
    if kind == "COMBO":
        return list(_options(entry).get("options", []))
    return None


def is_widget(entry) -> bool:
    kind = entry[0]
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not _options(entry).get("forceInput")


def has_control(name, entry) -> bool:
    """The frontend adds a control-after-generate widget (one more widget value) to this input: INT inputs that ask
    for it or are named seed / noise_seed, and combos that ask for it."""
    kind, opts = input_type(entry), _options(entry)
    if kind == "INT":
        return bool(opts.get("control_after_generate", name in CONTROL_NAMES))
    return kind == "COMBO" and bool(opts.get("control_after_generate"))


def all_inputs(spec) -> dict:
    """{name: (entry, "required" | "optional")} in the server's input order."""
    order = spec.get("input_order") or {s: list(spec["input"].get(s, {})) for s in ("required", "optional")}
    out = {}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            if name in spec["input"].get(section, {}):
                out[name] = (spec["input"][section][name], section)
    return out


def widget_inputs(spec) -> list:
    """[(name, has_control_value)] of a node's widget inputs, in the order of a UI node's widgets_values."""
    return [(name, has_control(name, entry)) for name, (entry, _) in all_inputs(spec).items() if is_widget(entry)]


def input_type(entry) -> str:
    kind = entry[0]
    return "COMBO" if isinstance(kind, list) else kind


def types_compatible(output_type, input_type_) -> bool:
    """ComfyUI's link rule (comfy_execution.validation.validate_node_input, non-strict): equal, "*", or overlapping
    comma-separated unions."""
    if output_type == input_type_ or "*" in (output_type, input_type_):
        return True
    if not isinstance(output_type, str) or not isinstance(input_type_, str):
        return False
    return bool({t.strip() for t in output_type.split(",")} & {t.strip() for t in input_type_.split(",")})


def check_value(name, entry, value) -> str | None:
    """Why the server (or the frontend) would reject `value` for this widget input, or None."""
    kind = input_type(entry)
    opts = _options(entry)
    if kind == "COMBO":
        options = combo_options(entry)
        if value not in options:
            shown = options if len(options) <= 12 else options[:12] + ["..."]
            return f"{name}: {value!r} is not one of the options {shown}"
        return None
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{name}: {value!r} is not a number"
        if kind == "INT" and value != int(value):
            return f"{name}: {value!r} is not an integer"
        if isinstance(value, float) and not math.isfinite(value):
            return f"{name}: {value!r} is not finite"
        if "min" in opts and value < opts["min"]:
            return f"{name}: {value!r} is below the minimum {opts['min']}"
        if "max" in opts and value > opts["max"]:
            return f"{name}: {value!r} is above the maximum {opts['max']}"
        return None
    if kind == "BOOLEAN" and not isinstance(value, bool):
        return f"{name}: {value!r} is not a boolean"
    if kind == "STRING" and not isinstance(value, str):
        return f"{name}: {value!r} is not a string"
    return None


# --- UI format ------------------------------------------------------------------------------------------

def _label(node) -> str:
    title = node.get("title")
    return f"node {node.get('id')} {node.get('type')}" + (f" ({title!r})" if title else "")


def widget_values(node, spec) -> tuple[dict, list]:
    """({input name: value}, problems) from a UI node's widgets_values, in the server's widget order."""
    problems, values = [], {}
    raw = node.get("widgets_values", [])
    if isinstance(raw, dict):  # some frontends save {name: value}
        return dict(raw), problems
    expected = widget_inputs(spec)
    want = sum(1 + control for _, control in expected)
    if len(raw) != want:
        problems.append(f"{_label(node)}: {len(raw)} widget values, the server's node has {want} "
                        f"({', '.join(n + (' + control' if c else '') for n, c in expected) or 'none'})")
        return values, problems
    it = iter(raw)
    for name, control in expected:
        values[name] = next(it)
        if control:
            c = next(it)
            if c not in CONTROL_VALUES:
                problems.append(f"{_label(node)}: control after generate of {name} is {c!r}, not one of "
                                f"{list(CONTROL_VALUES)}")
    return values, problems


def link_list(workflow) -> list:
    """The workflow's links as [id, from node, from slot, to node, to slot, type] (schema 0.4 lists or 1.0 dicts)."""
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    return [[l.get(k) for k in keys] if isinstance(l, dict) else l for l in workflow.get("links") or []]


def validate_workflow(workflow: dict, object_info: dict) -> list[str]:
    """Problems of a UI-format workflow against a server's /object_info; [] when it is valid."""
    problems = []
    nodes = workflow.get("nodes")
    if not isinstance(nodes, list) or not isinstance(workflow.get("links"), list):
        return ["not a UI-format workflow (needs 'nodes' and 'links' lists)"]
    links = link_list(workflow)
    if (workflow.get("definitions") or {}).get("subgraphs"):
        problems.append("the workflow has subgraphs, which this validator does not check")
    by_id = {}
    for n in nodes:
        if n.get("id") in by_id:
            problems.append(f"node id {n.get('id')} is used twice")
        by_id[n.get("id")] = n
    link_by_id = {}
    for link in links:
        if not isinstance(link, list) or len(link) != 6:
            problems.append(f"link {link!r} is not [id, from node, from slot, to node, to slot, type]")
            continue
        if link[0] in link_by_id:
            problems.append(f"link id {link[0]} is used twice")
        link_by_id[link[0]] = link
    if nodes and workflow.get("last_node_id", 0) < max(by_id, default=0):
        problems.append(f"last_node_id {workflow.get('last_node_id')} is below the largest node id {max(by_id)}")
    if links and workflow.get("last_link_id", 0) < max(link_by_id, default=0):
        problems.append(f"last_link_id {workflow.get('last_link_id')} is below the largest link id {max(link_by_id)}")

    for n in nodes:
        t = n.get("type")
        if t in FRONTEND_ONLY:
            if not isinstance(n.get("widgets_values"), list) or len(n["widgets_values"]) != 1 or \
                    not isinstance(n["widgets_values"][0], str):
                problems.append(f"{_label(n)}: a note holds one text widget value")
            continue
        if t in FRONTEND_VIRTUAL:
            problems.append(f"{_label(n)}: frontend-only {t} nodes are not supported by this validator")
            continue
        if t not in object_info:
            problems.append(f"{_label(n)}: node type {t!r} does not exist on the server (missing custom node pack, "
                            "or a renamed node)")
            continue
        spec = object_info[t]
        inputs = all_inputs(spec)
        values, p = widget_values(n, spec)
        problems += p
        linked = set()
        for slot, inp in enumerate(n.get("inputs", [])):
            name = inp.get("name")
            if name not in inputs:
                problems.append(f"{_label(n)}: input {name!r} does not exist on the server's node")
                continue
            if inp.get("link") is not None:
                linked.add(name)
                link = link_by_id.get(inp["link"])
                if link is None:
                    problems.append(f"{_label(n)}: input {name!r} refers to missing link {inp['link']}")
                elif link[3] != n["id"] or link[4] != slot:
                    problems.append(f"{_label(n)}: input {name!r} (slot {slot}) and link {link[0]} disagree")
        for name, (entry, section) in inputs.items():
            if name in linked:
                continue
            if is_widget(entry):
                if name in values:  # else the widget count is wrong, reported above
                    why = check_value(name, entry, values[name])
                    if why:
                        problems.append(f"{_label(n)}: {why}")
            elif section == "required":
                problems.append(f"{_label(n)}: required input {name!r} ({input_type(entry)}) is not connected")
        for slot, out in enumerate(n.get("outputs", [])):
            for lid in out.get("links") or []:
                link = link_by_id.get(lid)
                if link is None:
                    problems.append(f"{_label(n)}: output {slot} refers to missing link {lid}")
                elif link[1] != n["id"] or link[2] != slot:
                    problems.append(f"{_label(n)}: output {slot} and link {lid} disagree")

    for lid, src_id, src_slot, dst_id, dst_slot, typ in (l for l in links if isinstance(l, list) and len(l) == 6):
        src, dst = by_id.get(src_id), by_id.get(dst_id)
        if src is None or dst is None:
            problems.append(f"link {lid}: node {src_id if src is None else dst_id} does not exist")
            continue
        if src["type"] not in object_info or dst["type"] not in object_info:
            continue  # reported above
        outputs = object_info[src["type"]]["output"]
        if not 0 <= src_slot < len(outputs):
            problems.append(f"link {lid}: {_label(src)} has no output slot {src_slot}")
            continue
        dst_inputs = dst.get("inputs", [])
        if not 0 <= dst_slot < len(dst_inputs):
            problems.append(f"link {lid}: {_label(dst)} has no input slot {dst_slot}")
            continue
        name = dst_inputs[dst_slot]["name"]
        found = all_inputs(object_info[dst["type"]]).get(name)
        if found is None:
            continue  # reported above
        out_type, in_type = outputs[src_slot], input_type(found[0])
        if not types_compatible(out_type, in_type):
            problems.append(f"link {lid}: {_label(src)} output {src_slot} gives {out_type}, but {_label(dst)} input "
                            f"{name!r} takes {in_type}")
        if typ != out_type and not types_compatible(typ, out_type):
            problems.append(f"link {lid}: recorded type {typ} differs from the source output type {out_type}")
        src_outputs = src.get("outputs") or []
        if src_slot >= len(src_outputs) or lid not in (src_outputs[src_slot].get("links") or []):
            problems.append(f"link {lid}: not listed on {_label(src)} output {src_slot}")
        if dst_inputs[dst_slot].get("link") != lid:
            problems.append(f"link {lid}: {_label(dst)} input {name!r} does not refer back to it")
    return problems


def ui_to_api(workflow: dict, object_info: dict, replace: dict | None = None, overrides: dict | None = None) -> dict:
    """API-format graph {id: {"class_type", "inputs", "_meta"}} of a UI workflow, as the frontend queues it.

    Frontend-only notes are dropped; muted (mode 2) and bypassed (mode 4) nodes are not supported.
    replace: {node type: (new type, {widget input: value})} swaps a node for another with the same outputs
        (e.g. a checkpoint loader for a test model); the new node's widget values are given, its links kept.
    overrides: {node type: {input: value}} sets widget values after conversion (all nodes of that type).
    """
    replace, overrides = replace or {}, overrides or {}
    links = {l[0]: l for l in link_list(workflow)}
    graph = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        if node.get("mode", 0) != 0:
            raise ValueError(f"{_label(node)}: muted or bypassed nodes are not converted")
        if node["type"] in replace:
            class_type, inputs = replace[node["type"]][0], dict(replace[node["type"]][1])
        else:
            class_type = node["type"]
            if class_type not in object_info:
                raise ValueError(f"{_label(node)}: node type {class_type!r} does not exist on the server")
            inputs, problems = widget_values(node, object_info[class_type])
            if problems:
                raise ValueError("; ".join(problems))
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                _, src, slot, _, _, _ = links[inp["link"]]
                inputs[inp["name"]] = [str(src), slot]
        inputs.update(overrides.get(class_type, {}))
        graph[str(node["id"])] = {"class_type": class_type, "inputs": inputs,
                                  "_meta": {"title": node.get("title") or class_type}}
    return graph


def validate_prompt(prompt: dict, object_info: dict) -> list[str]:
    """Problems of an API-format graph (what POST /prompt receives) against /object_info; [] when valid."""
    problems = []
    for node_id, node in prompt.items():
        t = node.get("class_type")
        label = f"node {node_id} {t}"
        if t not in object_info:
            problems.append(f"{label}: node type {t!r} does not exist on the server")
            continue
        inputs = all_inputs(object_info[t])
        given = node.get("inputs", {})
        for name in given:
            if name not in inputs:
                problems.append(f"{label}: input {name!r} does not exist on the server's node")
        for name, (entry, section) in inputs.items():
            if name not in given:
                if section == "required":
                    problems.append(f"{label}: required input {name!r} is missing")
                continue
            value = given[name]
            if isinstance(value, list):
                if len(value) != 2 or str(value[0]) not in prompt:
                    problems.append(f"{label}: input {name!r} links to {value!r}, which is not in the graph")
                    continue
                src_type = prompt[str(value[0])].get("class_type")
                if src_type not in object_info:
                    continue
                outputs = object_info[src_type]["output"]
                if not 0 <= value[1] < len(outputs):
                    problems.append(f"{label}: input {name!r} links to missing output {value[1]} of {src_type}")
                elif not types_compatible(outputs[value[1]], input_type(entry)):
                    problems.append(f"{label}: input {name!r} takes {input_type(entry)}, linked to {src_type} "
                                    f"output {outputs[value[1]]}")
            elif is_widget(entry):
                why = check_value(name, entry, value)
                if why:
                    problems.append(f"{label}: {why}")
            else:
                problems.append(f"{label}: input {name!r} takes a {input_type(entry)} link, got the value {value!r}")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workflows", nargs="+", help="UI-format workflow JSON files")
    ap.add_argument("--server", default="http://127.0.0.1:8188", help="a running ComfyUI (default %(default)s)")
    args = ap.parse_args(argv)
    info = fetch_object_info(args.server)
    bad = 0
    for path in args.workflows:
        with open(path) as f:
            problems = validate_workflow(json.load(f), info)
        print(f"{path}: {'ok' if not problems else str(len(problems)) + ' problem(s)'}")
        for p in problems:
            print("  -", p)
        bad += bool(problems)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
