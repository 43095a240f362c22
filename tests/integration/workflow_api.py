"""UI-format workflows -> API-format graphs, using a running server's /object_info.

Widget values are matched to a node's widget inputs in the server's input order; an INT input
with a control-after-generate widget (explicit, or named seed / noise_seed as the frontend does)
carries one extra value in the UI format, which is skipped. Frontend-only nodes (notes) are
dropped.
"""

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote"}


def widget_inputs(spec):
    """[(name, has_control_value)] of a node's widget inputs, in the order of widgets_values."""
    out = []
    order = spec.get("input_order") or {s: list(spec["input"].get(s, {})) for s in ("required", "optional")}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            entry = spec["input"][section][name]
            kind = entry[0]
            opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            if (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput"):
                control = bool(opts.get("control_after_generate", name in ("seed", "noise_seed")))
                out.append((name, control))
    return out


def ui_to_api(workflow, object_info, replace=None, overrides=None):
    """API graph {id: {"class_type", "inputs"}} of a UI workflow.

    replace: {node type: (new type, widget inputs dict)} swaps a node (same output slots).
    overrides: {node type: {input: value}} changes widget values after conversion.
    """
    replace, overrides = replace or {}, overrides or {}
    links = {l[0]: l for l in workflow["links"]}
    graph = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        inputs = {}
        if node["type"] in replace:
            class_type, inputs = replace[node["type"]][0], dict(replace[node["type"]][1])
        else:
            class_type = node["type"]
            values = list(node.get("widgets_values", []))
            for name, control in widget_inputs(object_info[class_type]):
                inputs[name] = values.pop(0)
                if control:
                    values.pop(0)
            if values:
                raise ValueError(f"{class_type}: {len(values)} widget values left over")
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                _, src, slot, _, _, _ = links[inp["link"]]
                inputs[inp["name"]] = [str(src), slot]
        inputs.update(overrides.get(class_type, {}))
        graph[str(node["id"])] = {"class_type": class_type, "inputs": inputs}
    return graph
