"""Training step time and peak memory: the ComfyUI backend (Train node path) vs the diffusers backend.

One SoftREPA training step (``softrepa_step`` over all B*B (image, prompt) pairs + an AdamW
step, as the Trainer does) on the same weights through
- comfy: ``ComfyBackend`` on a ComfyUI MODEL built under ``torch.inference_mode()`` as a loader
  node builds it, used inside ``backend.session()``, with the Train node's token layout and
  defaults (``RunSettings``: SD1.5 SoftREPA, 4 tokens in the down blocks, time table on); and
- diffusers: ``DiffusersBackend`` on ``comfy_env.diffusers_unet(model)`` (the same weights).
Both run in fp32 on the CPU. tau is 1 (not 0.07) so that the random model's loss is not
saturated and the two backends' losses can be compared; the cost of a step does not depend on it.

Model: an SD1.5-shaped UNet with random weights: channel_mult (1, 2, 4, 4) (cross-attention in
the first three levels and the middle block, as SD1.5), 8 heads, 77-token context of width 768,
but 1 res block and transformer depth 1 per level (SD1.5: 2 and 1) and model_channels 64 (SD1.5:
320; head widths 8/16/32 instead of 40/80/160); 32x32 latents (256 px). Full SD1.5 width, or
64x64 latents, do not fit a ~15 min run on 2 CPU cores: a B=16 step is 256 UNet forward and
backward passes (1-3 min here already), and at 32x32 the 1024-token self-attention of the first
level dominates the step at this width (model_channels 32 is barely faster).
``comfy_env.tiny_sd15`` is not used because it fixes 2 heads.

Chunk (pairs per denoiser call): the Train node's default (``DEFAULT_CHUNK`` in
nodes/train_nodes.py, 16: at B=4 all 16 pairs in one call, at B=16 whole image rows of 16 pairs)
and 0, all B*B pairs in one call (``RunSettings().chunk``, the CLI's default: at B=16 that is
256 pairs at once, so activation memory grows ~16x from B=4), plus ``--chunk`` if it differs.
At B=4 both run the same naive step, so that measurement is shared.

Peak memory: every (backend, B, chunk) runs in a fresh subprocess that builds only what its
backend needs (the diffusers one keeps the ComfyUI model it converted, untouched, so no freed
memory is reused by the step), enters the session, returns freed heap memory to the OS
(``malloc_trim``), resets the kernel's RSS high-water mark (``/proc/self/clear_refs``, so the
setup's own transient peak cannot hide the step's) and reports peak RSS (VmHWM, what
``ru_maxrss`` reads) minus the RSS just before the step. On CPU this is the honest measure: it
counts everything the step touches (autograd graph, attention buffers, allocator overhead),
which tracemalloc does not see. A cap (``--mem-cap-gb``, RLIMIT_AS above the setup's address
space) protects the shared machine: a step that needs more fails with an allocation error and
is reported as "> cap" (a MISS) instead of running into the OOM killer; such steps are not timed.

Seconds per step: one more subprocess holds both backends (each with its own tokens and AdamW)
and alternates them step by step, flipping the order every pair, after one warm-up step each;
the median is reported (``--rounds`` pairs at the smallest B, ``--rounds-big`` at larger B: a
B=16 step takes minutes here). The ratio is the median of the per-pair ratios. The memory
runs' single steps (fresh process, first step) are shown too, as a second opinion.

``--quick`` (tiny UNet, 8x8 latents) runs everything in one subprocess, so its memory numbers
are indicative only; it is a smoke run of ~20 s.

ComfyUI on a CPU (``main.py --cpu``) picks its sub-quadratic attention for inference (PyTorch
SDPA is its default on NVIDIA GPUs); the training backend overrides attention with SDPA on its
clone, so the comfy rows use SDPA either way (before that override they were 2x slower). The
harness imports ComfyUI as ``main.py --cpu`` does; ``--comfy-attention pytorch`` starts it with
``--use-pytorch-cross-attention`` instead, and by default the run ends with a diagnostic (no
target) at the smallest B that does so (``--no-diagnostic`` skips it).

Targets: peak memory growth B=4 -> B=16 <= 1.5x (per backend and chunk); comfy seconds per step
/ diffusers seconds per step <= 1.3x (per B and chunk). Each is printed with PASS or MISS.

    COMFYUI_PATH=/path/to/ComfyUI python bench/comfy_training.py [--sizes 4 16] [--chunk 16]
        [--rounds 3] [--rounds-big 1] [--threads 1] [--mem-cap-gb 10] [--comfy-attention default|pytorch]
        [--no-diagnostic] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))

BACKENDS = ("comfy", "diffusers")
FULL = {"width": 64, "mult": (1, 2, 4, 4), "heads": 8, "latent": 32}
QUICK = {"width": 32, "mult": (1, 2, 2), "heads": 2, "latent": 8}
T_STEP = 500
TAU = 1.0


# --- worker side (imports torch and ComfyUI) ------------------------------------------------

def import_comfy(attention: str):
    import comfy_env

    root = comfy_env.find_comfyui()
    if root is None:
        sys.exit("ComfyUI not found: set COMFYUI_PATH")
    if attention == "pytorch":  # must be set before comfy.model_management is imported
        sys.path.insert(0, root)
        import comfy.cli_args
        import comfy.options  # noqa: F401

        comfy.cli_args.args.use_pytorch_cross_attention = True
    if not comfy_env.import_comfy():
        sys.exit("ComfyUI import failed")
    return comfy_env


def unet_config(comfy_env, spec: dict) -> dict:
    """SD1.5's unet_config with this bench's width, levels, 1 res block and transformer depth 1."""
    n = len(spec["mult"])
    attn = [1] * (n - 1) + [0]  # SD1.5: no cross-attention at the deepest level
    return dict(comfy_env.TINY_SD15_UNET, model_channels=spec["width"], channel_mult=list(spec["mult"]),
                num_res_blocks=[1] * n, transformer_depth=attn, transformer_depth_middle=1,
                transformer_depth_output=[d for d in attn for _ in (0, 1)],  # res blocks + 1 per level
                image_size=spec["latent"], context_dim=768)


def build_model(comfy_env, spec: dict, seed: int = 0):
    """A ComfyUI MODEL (ModelPatcher) built like a loader node builds it: under inference mode."""
    import comfy.supported_models
    import torch

    with torch.inference_mode():
        model_config = comfy.supported_models.SD15(unet_config(comfy_env, spec))
        model_config.unet_config["num_heads"] = spec["heads"]
        model_config.set_inference_dtype(torch.float32, None)
        model = model_config.get_model({})
        comfy_env.init_weights(model.diffusion_model, seed)
        model.eval()
        return comfy_env._patcher(model)


class Run:
    """One backend with its own tokens, optimizer and data: ``step(B, chunk)`` is one training step."""

    def __init__(self, name, backend, layout, cfg, spec, pack):
        import torch

        self.name, self.backend, self.spec, self.pack = name, backend, spec, pack
        self.tokens = pack["trainer"].make_tokens(layout, torch.Generator().manual_seed(1))
        params = [p for p in (self.tokens.static, self.tokens.time) if p is not None]
        self.opt = torch.optim.AdamW([{"params": [p]} for p in params], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                     weight_decay=cfg.weight_decay)
        self.data = {}

    def batch(self, B):
        import torch

        if B not in self.data:
            g, lat = torch.Generator().manual_seed(2), self.spec["latent"]
            self.data[B] = (torch.randn(B, 4, lat, lat, generator=g), {"context": torch.randn(B, 77, 768, generator=g)},
                            torch.randn(1, 4, lat, lat, generator=g))
        return self.data[B]

    def step(self, B, chunk):
        x0, cond, noise = self.batch(B)
        self.opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        out = self.pack["objectives"].softrepa_step(self.backend, self.tokens, x0, cond, T_STEP, noise, tau=TAU,
                                                    chunk=chunk or None)
        self.opt.step()
        dt = time.perf_counter() - t0
        self.opt.zero_grad(set_to_none=True)
        return dt, out


def setup(args, names):
    """(runs by name, session context, default chunk) for the given backends on one model."""
    import torch

    torch.set_num_threads(args.threads)
    comfy_env = import_comfy(args.comfy_attention)
    from pack_import import submodule

    pack = {"objectives": submodule("training.objectives"), "trainer": submodule("training.trainer"),
            "comfy": submodule("nodes.comfy_backend"), "diffusers": submodule("training.diffusers_backend"),
            "run": submodule("nodes.train_run"), "tokens": submodule("training.tokens")}
    spec = QUICK if args.quick else FULL
    spec = dict(spec, width=args.width or spec["width"], latent=args.latent or spec["latent"])
    model = build_model(comfy_env, spec)
    settings = pack["run"].RunSettings()
    layout, cfg = settings.layout(model), settings.config()
    runs, session = {}, contextlib.nullcontext()
    for name in names:
        if name == "comfy":
            backend = pack["comfy"].ComfyBackend(model, pack["tokens"].SoftTokens(layout))
            session = backend.session()
        else:
            backend = pack["diffusers"].DiffusersBackend(comfy_env.diffusers_unet(model))
        runs[name] = Run(name, backend, layout, cfg, spec, pack)
    runs["_model"] = model  # keeps the ComfyUI model alive in every worker
    # The Train node sets its own default in its schema; RunSettings' (the CLI's) is 0 = all pairs.
    return runs, session, getattr(submodule("nodes.train_nodes"), "DEFAULT_CHUNK", settings.chunk)


def proc_status() -> dict:
    """VmRSS / VmHWM / VmSize of this process in MB (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM", "VmSize"):
                out[key] = int(line.split()[1]) / 1024
    return out


def reset_peak() -> bool:
    """Reset the RSS high-water mark (VmHWM, ru_maxrss) to the current RSS; False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc malloc_trim), so a later step cannot reuse it unseen."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cap_memory(args) -> None:
    """Limit the address space to the current size plus --mem-cap-gb (allocations beyond fail)."""
    limit = int((proc_status()["VmSize"] + args.mem_cap_gb * 1024) * 2 ** 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def effective(B: int, chunk: int) -> int:
    """The chunk softrepa_step really uses: 0 (all pairs at once) when it holds every pair."""
    return 0 if chunk <= 0 or chunk >= B * B else chunk


def chunk_list(default_chunk: int, chunk: int) -> list:
    """The chunks to report: the Train node's default, 0 (all pairs at once) and --chunk, without repeats."""
    return list(dict.fromkeys([default_chunk, 0, chunk]))


def plan(sizes, chunks) -> list:
    """Distinct (B, effective chunk) steps to run, smallest B first."""
    out = []
    for B in sorted(sizes):
        for c in chunks:
            if (B, effective(B, c)) not in out:
                out.append((B, effective(B, c)))
    return out


def measure_peak(run, B: int, chunk: int, args) -> dict:
    """One step under the memory cap: peak RSS growth over the RSS just before it (MB), time, loss."""
    import gc

    run.batch(B)
    gc.collect()
    trim_heap()
    out = {} if reset_peak() else {"note": "no /proc/self/clear_refs: the peak includes the setup"}
    before = proc_status()
    cap_memory(args)
    try:
        dt, res = run.step(B, chunk)
        out.update(status="ok", seconds=dt, mode=res["mode"], loss=res["loss"])
    except (RuntimeError, MemoryError) as e:
        out.update(status="over cap", error=str(e).strip().splitlines()[0][:200])
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    out.update(setup_rss_mb=before["VmRSS"], peak_mb=proc_status()["VmHWM"] - before["VmRSS"],
               cap_mb=args.mem_cap_gb * 1024)
    return out


def time_steps(runs, steps, args) -> dict:
    """Step times per "backend B chunk", backends alternated (order flipped every step pair),
    after one warm-up step per backend; ``steps`` is [(B, chunk, [backend names]), ...]."""
    small = min(B for B, _, _ in steps)
    times, losses = {}, {}
    cap_memory(args)
    for name in BACKENDS:
        runs[name].step(small, steps[0][1])
    k = 0
    for B, chunk, names in steps:
        for _ in range(args.rounds if B == small else args.rounds_big):
            for name in (names if k % 2 == 0 else names[::-1]):
                dt, res = runs[name].step(B, chunk)
                times.setdefault(f"{name} {B} {chunk}", []).append(dt)
                losses.setdefault(f"{name} {B} {chunk}", res["loss"])
            k += 1
    return {"times": times, "losses": losses}


def memory_worker(args) -> None:
    """Peak RSS growth of one step of one (backend, B, chunk) in this fresh process; one JSON line."""
    runs, session, default_chunk = setup(args, [args.backend])
    chunk = default_chunk if args.chunk < 0 else args.chunk
    with session:
        out = measure_peak(runs[args.backend], args.B, effective(args.B, chunk), args)
    print(json.dumps(dict(out, backend=args.backend, B=args.B, chunk=chunk, default_chunk=default_chunk)), flush=True)


def timing_worker(args) -> None:
    """Both backends in this process, steps alternated; one JSON line of step times."""
    runs, session, _ = setup(args, list(BACKENDS))
    with session:
        out = time_steps(runs, json.loads(args.steps), args)
    print(json.dumps(out), flush=True)


def quick_worker(args) -> None:
    """--quick: everything in this one process (memory numbers are indicative only: earlier steps'
    freed memory may be reused); the same JSON as the separate workers, in one line."""
    runs, session, default_chunk = setup(args, list(BACKENDS))
    memory = []
    with session:
        for B, c in plan(args.sizes, chunk_list(default_chunk, args.chunk)):
            for name in BACKENDS:
                memory.append(dict(measure_peak(runs[name], B, c, args), backend=name, B=B, chunk=c))
        steps = [(B, c, list(BACKENDS)) for B, c in plan(args.sizes, chunk_list(default_chunk, args.chunk))]
        timing = time_steps(runs, steps, args)
    print(json.dumps({"default_chunk": default_chunk, "memory": memory, "timing": timing}), flush=True)


# --- driver side (no torch here: the workers do all the work) --------------------------------

def worker_cmd(args, kind: str, attention: str | None = None, **extra) -> list:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--threads", str(args.threads),
           "--comfy-attention", attention or args.comfy_attention, "--mem-cap-gb", str(args.mem_cap_gb),
           "--rounds", str(args.rounds), "--rounds-big", str(args.rounds_big), "--chunk", str(args.chunk),
           "--sizes", *map(str, args.sizes)]
    for flag in ("quick",):
        if getattr(args, flag):
            cmd.append(f"--{flag}")
    for flag in ("width", "latent"):
        if getattr(args, flag):
            cmd += [f"--{flag}", str(getattr(args, flag))]
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    return cmd


def run_worker(cmd) -> dict:
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        err = (res.stderr.strip().splitlines() or [""])[-1]
        return {"status": f"crashed (exit {res.returncode})", "error": err}
    return json.loads(lines[-1])


def median_ratio(a: list, b: list) -> float:
    """Median of per-round ratios a_i / b_i (rounds interleaved)."""
    return statistics.median(x / y for x, y in zip(a, b))


def report(args, default_chunk, memory, timing) -> None:
    small, big = min(args.sizes), max(args.sizes)
    mem = {(r["backend"], r["B"], effective(r["B"], r["chunk"])): r for r in memory}
    times = timing.get("times", {})
    sec = {k: statistics.median(v) for k, v in times.items()}
    chunks = chunk_list(default_chunk, args.chunk)
    label = {c: str(c) for c in chunks}
    label[0] = "0 (all pairs)"
    label[default_chunk] = f"{default_chunk} (node default)"

    def shared(B, c):  # an earlier chunk runs the same step at this B
        return any(effective(B, x) == effective(B, c) for x in chunks[:chunks.index(c)])

    print(f"\n{'backend':<11}{'B':>4}{'pairs':>7}  {'chunk':<19}{'mode':<10}{'peak MB':>10}{'s/step':>9}"
          f"{'timed':>7}{'1st s':>9}{'loss':>11}")
    for B in sorted(args.sizes):
        for c in chunks:
            e = effective(B, c)
            for name in BACKENDS:
                r = mem.get((name, B, e), {"status": "missing"})
                key = f"{name} {B} {e}"
                peak = f"{r['peak_mb']:.0f}" if r["status"] == "ok" else \
                    (f">{r['cap_mb']:.0f}" if r["status"] == "over cap" else r["status"])
                s = f"{sec[key]:.2f}" if key in sec else "-"
                first = f"{r['seconds']:.2f}" if "seconds" in r else "-"
                loss = f"{r['loss']:.6f}" if "loss" in r else "-"
                mode = r.get("mode", "-") + ("*" if shared(B, c) else "")
                print(f"{name:<11}{B:>4}{B * B:>7}  {label[c]:<19}{mode:<10}{peak:>10}{s:>9}"
                      f"{len(times.get(key, [])):>7}{first:>9}{loss:>11}")
    if any(shared(B, c) for B in args.sizes for c in chunks):
        print("* the same step as an earlier chunk's row at this B (the chunk holds every pair): one measurement")
    print("s/step: median of the interleaved timing run; 1st s: the memory run's single step in a fresh process")
    for r in memory:
        if r["status"] not in ("ok",):
            print(f"  {r.get('backend')} B={r.get('B')} chunk={r.get('chunk')}: {r['status']}: {r.get('error', '')}")

    print(f"\npeak memory growth B={small} -> B={big} (target <= 1.5x):")
    verdict = {}
    for c in chunks:
        for name in BACKENDS:
            lo, hi = mem.get((name, small, effective(small, c))), mem.get((name, big, effective(big, c)))
            if not lo or lo["status"] != "ok" or not hi:
                text, ok = "not measured", False
            elif hi["status"] == "ok":
                g = hi["peak_mb"] / lo["peak_mb"]
                text, ok = f"{g:.2f}x", g <= 1.5
            else:
                est = lo["peak_mb"] * (big / small) ** 2 / 1024 if effective(small, c) == 0 == effective(big, c) else 0
                text = (f"> {hi['cap_mb'] / lo['peak_mb']:.1f}x (over the {args.mem_cap_gb:g} GB cap"
                        + (f"; ~{est:.0f} GB if linear in pairs)" if est else ")")
                        if hi["status"] == "over cap" else hi["status"])
                ok = False
            verdict.setdefault(c, []).append(ok)
            print(f"  {name:<11}chunk {label[c]:<19}{text:<56}  {'PASS' if ok else 'MISS'}")

    print("comfy / diffusers seconds per step (target <= 1.3x; median of interleaved per-step ratios):")
    tverdict = {}
    for B in sorted(args.sizes):
        for c in chunks:
            e = effective(B, c)
            if shared(B, c):
                continue  # the same step as an earlier chunk's, reported there
            tc, td = times.get(f"comfy {B} {e}"), times.get(f"diffusers {B} {e}")
            if tc and td:
                ratio = median_ratio(tc, td)
                ok = ratio <= 1.3
                text = f"{ratio:.2f}x ({len(tc)} pair{'s' if len(tc) > 1 else ''})"
                print(f"  B={B:<9}chunk {label[c]:<19}{text:<56}  {'PASS' if ok else 'MISS'}")
            else:
                ok = None
                print(f"  B={B:<9}chunk {label[c]:<19}{'n/a: a step did not fit in the memory cap':<56}  "
                      "not measured")
            tverdict.setdefault(c, []).append(ok)
    print()
    for c in chunks:
        t = tverdict.get(c, [])
        measured = [x for x in t if x is not None]
        tt = ("not measurable" if not measured else "MISS" if not all(measured) else "PASS"
              if len(measured) == len(t) else f"PASS where measured ({len(t) - len(measured)} not measured)")
        print(f"chunk {label[c]}: memory target {'PASS' if all(verdict[c]) else 'MISS'}, speed target {tt}")


def diagnostic(args, default_chunk, memory, timing) -> None:
    """The smallest B again with ComfyUI's PyTorch attention: how much of the gap is the attention choice."""
    B = min(args.sizes)
    c = effective(B, default_chunk)
    print(f"\ndiagnostic (no target): ComfyUI with --use-pytorch-cross-attention (PyTorch SDPA, as diffusers and as "
          f"ComfyUI's default on NVIDIA GPUs), B={B}, chunk {default_chunk}:", flush=True)
    r = run_worker(worker_cmd(args, "memory", attention="pytorch", backend="comfy", B=B, chunk=c))
    t = run_worker(worker_cmd(args, "timing", attention="pytorch", steps=json.dumps([(B, c, list(BACKENDS))])))
    base = next((m for m in memory if m["backend"] == "comfy" and m["B"] == B
                 and effective(B, m["chunk"]) == c and m["status"] == "ok"), None)
    tt = t.get("times", {})
    tc, td = tt.get(f"comfy {B} {c}"), tt.get(f"diffusers {B} {c}")
    old = timing.get("times", {}).get(f"comfy {B} {c}")
    if r.get("status") == "ok" and tc and td:
        print(f"  comfy peak {r['peak_mb']:.0f} MB (default attention: {base['peak_mb']:.0f} MB), "
              f"{statistics.median(tc):.2f} s/step (default attention: "
              f"{statistics.median(old) if old else float('nan'):.2f}), comfy / diffusers "
              f"{median_ratio(tc, td):.2f}x ({len(tc)} interleaved pairs)")
    else:
        print(f"  failed: {r.get('status')} {r.get('error', '')} {t.get('error', '')}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4, 16], help="images per step B (B*B pairs)")
    ap.add_argument("--chunk", type=int, default=16,
                    help="another chunk (pairs per denoiser call) to measure besides the node's default and 0")
    ap.add_argument("--rounds", type=int, default=3, help="timed step pairs at the smallest B (median is kept)")
    ap.add_argument("--rounds-big", type=int, default=1, help="timed step pairs at the larger B")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared 2-core machine OpenMP barriers make timings swing)")
    ap.add_argument("--comfy-attention", choices=("default", "pytorch"), default="default",
                    help="ComfyUI's attention: its default for the device (CPU: sub-quadratic) or PyTorch SDPA")
    ap.add_argument("--mem-cap-gb", type=float, default=10.0,
                    help="most memory one step may allocate; larger steps fail and are reported as over the cap")
    ap.add_argument("--width", type=int, default=0, help="model_channels (default 64; --quick: 32)")
    ap.add_argument("--latent", type=int, default=0, help="latent height and width (default 32; --quick: 8)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny UNet at 8x8 latents, all in one subprocess (memory indicative only): seconds")
    ap.add_argument("--diagnostic", action=argparse.BooleanOptionalAction, default=True,
                    help="with the default attention, also time B=min(sizes) with ComfyUI's PyTorch attention")
    ap.add_argument("--worker", choices=("memory", "timing", "quick"), help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="comfy", help=argparse.SUPPRESS)
    ap.add_argument("--B", type=int, default=4, help=argparse.SUPPRESS)
    ap.add_argument("--steps", default="[]", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.sizes = sorted(set(args.sizes))
    if args.worker:
        return {"memory": memory_worker, "timing": timing_worker, "quick": quick_worker}[args.worker](args)
    if len(args.sizes) < 2 or min(args.sizes) < 2:
        ap.error("--sizes needs at least two values >= 2")
    if not os.path.isfile("/proc/self/status"):
        sys.exit("this benchmark reads peak RSS from /proc (Linux)")

    wall_start = time.perf_counter()
    spec = QUICK if args.quick else FULL
    spec = dict(spec, width=args.width or spec["width"], latent=args.latent or spec["latent"])
    lat = spec["latent"]
    print(f"SoftREPA training step, SD1.5-shaped UNet (model_channels {spec['width']}, channel_mult "
          f"{list(spec['mult'])}, 1 res block, transformer depth 1, {spec['heads']} heads, context 77x768), "
          f"{lat}x{lat} latents ({8 * lat} px), fp32 CPU, {args.threads} thread(s), ComfyUI attention: "
          f"{args.comfy_attention}")
    if args.quick:
        res = run_worker(worker_cmd(args, "quick"))
        if "memory" not in res:
            sys.exit(f"quick worker failed: {res}")
        print("quick: one process for everything (memory growth indicative only)")
        report(args, res["default_chunk"], res["memory"], res["timing"])
        print(f"\ntotal bench time {time.perf_counter() - wall_start:.0f} s")
        return

    print(f"memory: a fresh subprocess per (backend, B, chunk), peak RSS growth of one step; cap "
          f"{args.mem_cap_gb:g} GB per step")
    small = min(args.sizes)
    first = run_worker(worker_cmd(args, "memory", backend="comfy", B=small, chunk=-1))
    if "default_chunk" not in first:
        sys.exit(f"memory worker failed: {first}")
    default_chunk = first["default_chunk"]
    memory = []

    def progress(r):
        memory.append(r)
        print(f"  {r['backend']:<10} B={r['B']:<3} chunk={r['chunk']:<3} {r['status']:<9} "
              f"{r.get('peak_mb', float('nan')):8.0f} MB  (at {time.perf_counter() - wall_start:.0f} s)", flush=True)

    progress(first)
    for B, c in plan(args.sizes, chunk_list(default_chunk, args.chunk)):
        for name in BACKENDS:
            if not any(r["backend"] == name and r["B"] == B and effective(B, r["chunk"]) == c for r in memory):
                progress(dict(run_worker(worker_cmd(args, "memory", backend=name, B=B, chunk=c)),
                              backend=name, B=B, chunk=c))
    steps = []
    for B, c in plan(args.sizes, chunk_list(default_chunk, args.chunk)):
        names = [n for n in BACKENDS if any(r["backend"] == n and r["B"] == B and effective(B, r["chunk"]) == c
                                            and r["status"] == "ok" for r in memory)]
        if names:
            steps.append((B, c, names))
    print(f"speed: one subprocess with both backends, steps alternated, {args.rounds} step pair(s) at B={small}, "
          f"{args.rounds_big} at larger B, after a warm-up", flush=True)
    timing = run_worker(worker_cmd(args, "timing", steps=json.dumps(steps)))
    if "times" not in timing:
        print(f"timing worker failed: {timing}")
    report(args, default_chunk, memory, timing)
    if args.diagnostic and args.comfy_attention == "default":
        diagnostic(args, default_chunk, memory, timing)
    print(f"\ntotal bench time {time.perf_counter() - wall_start:.0f} s")


if __name__ == "__main__":
    main()
