"""Regenerate the UI-format example workflows from the API-format ones.

    python api_to_ui.py object_info.json    # object_info.json = GET /object_info of a ComfyUI with the pack loaded

The UI format (what ComfyUI's "Load" menu and drag-and-drop take) needs each node's socket and widget
order, which only a running ComfyUI knows; the API format is what ``POST /prompt`` takes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_WIDGETS = {"seed", "noise_seed"}  # the frontend stores a "control after generate" value after these


def _input_spec(info: dict, name: str):
    for group in ("required", "optional"):
        if name in info["input"].get(group, {}):
            return info["input"][group][name]
    raise KeyError(name)


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _depths(api: dict) -> dict[str, int]:
    """Column of each node: the longest chain of links leading to it, so data flows left to right."""
    depth: dict[str, int] = {}

    def visit(key: str) -> int:
        if key not in depth:
            sources = [v[0] for v in api[key]["inputs"].values() if isinstance(v, list) and len(v) == 2]
            depth[key] = 1 + max((visit(k) for k in sources), default=-1)
        return depth[key]

    for key in api:
        visit(key)
    return depth


def _height(class_type: str, sockets: int, widgets: int, multiline: bool) -> int:
    images = class_type in IMAGE_NODES
    return 50 + 24 * (sockets + widgets) + (160 if multiline else 0) + (300 if images else 0)


IMAGE_NODES = {"LoadImage", "PreviewImage", "SaveImage"}


def convert(api: dict, object_info: dict) -> dict:
    ids = {key: i + 1 for i, key in enumerate(api)}
    depths, column_y = _depths(api), {}
    nodes, links = [], []
    outputs: dict[tuple[int, int], list[int]] = {}
    for order, (key, node) in enumerate(api.items()):
        info = object_info[node["class_type"]]
        names = [
            n
            for g in ("required", "optional")
            for n in info.get("input_order", {}).get(g, info["input"].get(g, {}))
        ]
        inputs, widgets = [], []
        for name in names:
            spec = _input_spec(info, name)
            value = node["inputs"].get(name)
            linked = isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            if linked:
                link_id = len(links) + 1
                src, slot = ids[value[0]], value[1]
                src_type = object_info[api[value[0]]["class_type"]]["output"][slot]
                links.append([link_id, src, slot, ids[key], len(inputs), src_type])
                outputs.setdefault((src, slot), []).append(link_id)
                entry = {
                    "name": name,
                    "type": spec[0] if isinstance(spec[0], str) else "COMBO",
                    "link": link_id,
                }
                if _is_widget(spec):
                    entry["widget"] = {"name": name}
                inputs.append(entry)
            elif not _is_widget(spec):  # an unconnected socket (e.g. an optional IMAGE) stays on the node
                inputs.append({"name": name, "type": spec[0], "link": None})
            else:
                widgets.append(value)
                if name in SEED_WIDGETS:
                    widgets.append("fixed")
                if spec[1:] and isinstance(spec[1], dict) and spec[1].get("image_upload"):
                    widgets.append("image")
        multiline = any(_input_spec(info, n)[1:] and isinstance(_input_spec(info, n)[1], dict)
                        and _input_spec(info, n)[1].get("multiline") for n in names)  # fmt: skip
        height = _height(node["class_type"], max(len(inputs), len(info["output"])), len(widgets), multiline)
        x, y = 40 + 380 * depths[key], column_y.get(depths[key], 40)
        column_y[depths[key]] = y + height + 50
        nodes.append({
            "id": ids[key], "type": node["class_type"], "pos": [x, y],
            "size": [340, height], "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": [],
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets,
        })  # fmt: skip
    for n in nodes:
        info = object_info[n["type"]]
        n["outputs"] = [
            {"name": name, "type": typ, "links": outputs.get((n["id"], slot), []), "slot_index": slot}
            for slot, (name, typ) in enumerate(zip(info["output_name"], info["output"]))
        ]
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {}, "version": 0.4}  # fmt: skip


def main() -> None:
    object_info = json.loads(Path(sys.argv[1]).read_text())
    here = Path(__file__).parent
    for api_file in sorted(here.glob("*_api.json")):
        ui = convert(json.loads(api_file.read_text()), object_info)
        out = api_file.with_name(api_file.name.replace("_api.json", ".json"))
        out.write_text(json.dumps(ui, indent=2))
        print(f"wrote {out.name}: {len(ui['nodes'])} nodes, {len(ui['links'])} links")


if __name__ == "__main__":
    main()
