"""Pictures of the example workflows as the ComfyUI frontend draws them, checked on the way.

    COMFYUI_PATH=/path/to/ComfyUI python scripts/workflow_screenshots.py [--docs soft_tokens_compare_sd15]

Starts a ComfyUI server (127.0.0.1) with this pack and the files the workflows expect (as the integration tests
provide them: tests/integration/workflow_env.py), opens every workflow in workflows/ in headless Chromium the way a
drag-and-drop does (tests/integration/browser_check.py), stops on any problem the check reports, and writes

- workflows/<name>.jpg: the graph, the thumbnail ComfyUI's template browser shows next to the template;
- docs/workflow_<name>.png for the workflow(s) named with --docs (the README's picture).

Needs ComfyUI with its requirements, selenium, and Debian's chromium and chromium-driver (test-only dependencies;
nothing is downloaded). Run it after changing a workflow (python scripts/make_workflows.py).
"""

import argparse
import glob
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", "integration")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", nargs="*", default=["soft_tokens_compare_sd15"],
                    help="workflows to picture in docs/ (default: %(default)s)")
    ap.add_argument("--thumbnail-width", type=int, default=640)
    args = ap.parse_args(argv)

    import comfy_env

    if not comfy_env.import_comfy():
        sys.exit("ComfyUI not found: set COMFYUI_PATH to a ComfyUI checkout")
    from browser_check import BrowserCheck, crop_graph, unavailable
    from workflow_env import start_workflow_server

    why = unavailable()
    if why:
        sys.exit(why)
    server = start_workflow_server()
    failed = []
    try:
        with tempfile.TemporaryDirectory() as shots, BrowserCheck(server.url, shots) as browser:
            for path in sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json"))):
                name = os.path.basename(path)[:-5]
                with open(path) as f:
                    report = browser.check(json.load(f), name)
                print(report)
                if report.problems:
                    failed.append(name)
                    continue
                thumb = crop_graph(report, os.path.join(ROOT, "workflows", name + ".jpg"),
                                   max_width=args.thumbnail_width, quality=80)
                print("  wrote", os.path.relpath(thumb, ROOT))
                if name in args.docs:
                    doc = crop_graph(report, os.path.join(ROOT, "docs", f"workflow_{name}.png"))
                    print("  wrote", os.path.relpath(doc, ROOT))
    finally:
        comfy_env.stop_server(server)
    if failed:
        sys.exit(f"problems in: {', '.join(failed)}")


if __name__ == "__main__":
    main()
