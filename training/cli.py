"""Command line: ``python -m training {convert,info} ...``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .demo.cli import add_parser as demo_parser
from .formats import load_tokens, save_tokens, train_config_of
from .layouts import ARCH_FAMILY, parse_blocks


def cmd_convert(args) -> int:
    src = Path(args.src)
    blocks = parse_blocks(args.blocks) if args.blocks else None
    tokens = load_tokens(src, arch=args.arch, blocks=blocks)
    out = Path(args.out) if args.out else _default_out(src)
    save_tokens(tokens, out, overwrite=args.force)
    print(f"wrote {out}: {tokens.layout.describe()}")
    return 0


def cmd_info(args) -> int:
    tokens = load_tokens(args.path)
    lay = tokens.layout
    print(f"file:        {args.path}")
    print(f"method:      {lay.method}")
    print(f"arch:        {lay.arch} ({lay.family})")
    print(f"tokens:      {lay.n_tokens} per set, sets {', '.join(lay.sets)}")
    print(f"width:       {lay.width}" + (f" (projected to {lay.text_width} by context_embedder)" if lay.projected else ""))
    where = ", ".join(map(str, lay.blocks))
    print(f"layers:      {lay.n_layers} token layer(s) on {where}")
    print(f"position:    {lay.position}")
    print(f"time table:  {'(%d, %d)' % lay.time_shape if lay.time_shape else 'none'}")
    print(f"parameters:  {tokens.n_params():,}")
    print(f"static:      mean {tokens.static.mean():.5f}, std {tokens.static.std():.5f}")
    for k, v in sorted(tokens.meta.items()):
        if k != "train_config":
            print(f"{k + ':':<13}{v}")
    cfg = train_config_of(tokens)
    if cfg:
        print("train config:", ", ".join(f"{k}={v}" for k, v in sorted(cfg.items())))
    return 0


def _default_out(src: Path) -> Path:
    name = src.name if src.is_dir() else src.parent.name
    return Path(f"{name or 'tokens'}.safetensors")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="convert an official token folder or .pth into a .safetensors token file")
    c.add_argument("src", help="official folder (dc_tokens.pth [+ dc_t_tokens.pth] or soft_tokens.pth + soft_t_tokens.pth) or the static .pth")
    c.add_argument("--out", help="output .safetensors (default: <folder name>.safetensors)")
    c.add_argument("--arch", choices=sorted(ARCH_FAMILY), help="override the architecture inferred from the shapes")
    c.add_argument("--blocks", help="override the block groups: 'down', 'down,mid' (UNet) or '0-4' (SD3). "
                                    "Default: what the release was trained with")
    c.add_argument("--force", action="store_true", help="overwrite an existing output file")
    c.set_defaults(fn=cmd_convert)
    i = sub.add_parser("info", help="print what a token file (or official folder) holds")
    i.add_argument("path")
    i.set_defaults(fn=cmd_info)
    demo_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
