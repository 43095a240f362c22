"""Training from a workflow graph: dataset, encode, train, save, score and plot nodes.

The nodes are thin: they declare their inputs and call nodes/comfy_data.py (datasets and
encoding), nodes/train_run.py (one training run) and the engine in training/.
"""

from __future__ import annotations

import os

import folder_paths
import numpy as np
import torch

import comfy.model_management
import comfy.utils
from comfy_api.latest import io, ui

from ..training.checkpoint import RunFiles, numbered_run, output_path, safe_subfolder
from ..training.datasets import CAPTION_MODES
from ..training.formats import load_tokens, save_tokens
from ..training.layouts import TIME_TABLE_CHOICES
from ..training.plot import history_to_loss_map, plot_history
from ..training.score import alignment_score, format_score
from ..training.trainer import Cancelled
from .comfy_backend import ComfyBackend
from .comfy_data import encode_dataset, folder_state, open_captioned_folder, summary_text
from .loader_nodes import SoftTokensType
from .patch import apply_soft_tokens, check_fits
from .paths import list_checkpoints, resolve_token_file, token_folder
from .train_run import INIT_CHOICES, PRECISIONS, RunSettings, check_run, run_files, train_on_model, val_pairs

CaptionedImages = io.Custom("CAPTIONED_IMAGES")
SoftTokenDataset = io.Custom("SOFT_TOKEN_DATASET")
NO_RESUME = "none"
CATEGORY = "conditioning/soft tokens/training"
PREVIEW_SIZE = 800
DEFAULT_CHUNK = 16  # pairs per denoiser call: B = 4 in one call, larger B in whole-row chunks


def cache_folder() -> str:
    """Where encodings are cached across runs and restarts (keyed by model, files and settings)."""
    return os.path.join(folder_paths.models_dir, "soft_tokens_cache")


class LoadCaptionedImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoadCaptionedImages",
            display_name="Load Captioned Images",
            category=CATEGORY,
            description="A folder of images with captions under ComfyUI's input directory, for soft-token training.",
            inputs=[
                io.Combo.Input("folder", options=folder_paths.get_input_subfolders(),
                               tooltip="A folder under ComfyUI/input: images with same-name .txt captions "
                                       "(kohya 'N_name' repeat folders count each image N times), or one .jsonl "
                                       "manifest ({\"image\": ..., \"caption\": ...} per line)."),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=64,
                             tooltip="Images are resized (shorter side) and center-cropped to this square size. "
                                     "512 for SD1.5, 1024 for SDXL and SD3."),
                io.Combo.Input("caption_mode", options=list(CAPTION_MODES), default="random",
                               tooltip="random: a random caption of an image each time (several captions per "
                                       "image, as the official COCO training). first: always the first."),
            ],
            outputs=[CaptionedImages.Output(display_name="images")],
        )

    @classmethod
    def validate_inputs(cls, folder):
        try:
            safe_subfolder(folder_paths.get_input_directory(), folder)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def fingerprint_inputs(cls, folder, resolution, caption_mode):
        """Re-run when files in the folder change (ComfyUI otherwise reuses the cached output)."""
        try:
            return folder_state(folder_paths.get_input_directory(), folder)
        except (ValueError, OSError):
            return float("nan")  # never equal: run and report the error

    @classmethod
    def execute(cls, folder, resolution, caption_mode) -> io.NodeOutput:
        ds = open_captioned_folder(folder_paths.get_input_directory(), folder, resolution, caption_mode)
        return io.NodeOutput(ds, ui=ui.PreviewText(summary_text(ds.report())))


class EncodeSoftTokenDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EncodeSoftTokenDataset",
            display_name="Encode Soft-Token Dataset",
            category=CATEGORY,
            description="Encodes every image with the VAE and every caption with the CLIP of the checkpoint you "
                        "train on. Encodings are cached on disk: a second run does not encode again.",
            inputs=[CaptionedImages.Input("images"),
                    io.Clip.Input("clip", tooltip="The CLIP of the checkpoint you will train on."),
                    io.Vae.Input("vae", tooltip="The VAE of the checkpoint you will train on.")],
            outputs=[SoftTokenDataset.Output(display_name="dataset")],
        )

    @classmethod
    def execute(cls, images, clip, vae) -> io.NodeOutput:
        total = max(1, images.n_images)
        bar = comfy.utils.ProgressBar(total)
        data = encode_dataset(images, clip, vae, cache_folder(),
                              progress=lambda done, n: bar.update_absolute(done, max(n, 1)))
        return io.NodeOutput(data, ui=ui.PreviewText(summary_text(data.report)))


def _resume_options() -> list[str]:
    return [NO_RESUME] + list_checkpoints()


class TrainSoftTokens(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = RunSettings()
        return io.Schema(
            node_id="TrainSoftTokens",
            display_name="Train Soft Tokens",
            category=CATEGORY,
            description="Trains SoftREPA or AGSM soft tokens for this model on an encoded dataset. The model "
                        "itself is not changed. Checkpoints go to models/soft_tokens; Cancel keeps a usable "
                        "partial result.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5, SDXL or SD3 model to train tokens for (without soft "
                                                "tokens applied)."),
                SoftTokenDataset.Input("dataset", tooltip="From Encode Soft-Token Dataset, with this model's CLIP "
                                                          "and VAE."),
                io.Combo.Input("method", options=["softrepa", "agsm"], default="softrepa",
                               tooltip="softrepa: contrastive loss over a BxB matrix of image x caption errors. "
                                       "agsm: positive and negative tokens with a bounded score-matching target."),
                io.Int.Input("steps", default=d.steps, min=1, max=1_000_000,
                             tooltip="Optimizer steps in total (when resuming: the new total)."),
                io.Int.Input("batch", default=d.batch, min=2, max=64,
                             tooltip="Images per step B; each step evaluates all B x B image-caption pairs "
                                     "(official: 4)."),
                io.Int.Input("chunk", default=DEFAULT_CHUNK, min=0, max=4096,
                             tooltip="Pairs per denoiser call: bounds memory, never changes the result (16 keeps "
                                     "memory flat as B grows). 0 = all B x B pairs at once. Lower it if you run "
                                     "out of memory."),
                io.Float.Input("learning_rate", default=d.lr, min=1e-6, max=1.0, step=1e-4,
                               tooltip="AdamW learning rate (official 1e-3), with cosine warm restarts."),
                io.Int.Input("tokens", default=d.tokens, min=1, max=64,
                             tooltip="Soft tokens per set and layer (official 4)."),
                io.String.Input("blocks", default="",
                                tooltip="Empty = official: SD1.5 down (SoftREPA) or down,mid (AGSM); SDXL down,mid; "
                                        "SD3 joint blocks 0-4. Or e.g. 'down,mid' or '0-4'."),
                io.Combo.Input("time_table", options=list(TIME_TABLE_CHOICES), default="official",
                               tooltip="Time-dependent part of the tokens (100 timestep buckets). official: off for "
                                       "SoftREPA SDXL, on otherwise."),
                io.Combo.Input("init", options=list(INIT_CHOICES), default="official",
                               tooltip="official: the empty prompt's BOS embedding for SD1.5, N(0, 0.02) otherwise."),
                io.Float.Input("tau", default=d.tau, min=1e-3, max=10.0, step=0.01,
                               tooltip="SoftREPA temperature tau (official 0.07)."),
                io.Float.Input("scale", default=d.scale, min=0.01, max=100.0, step=0.1,
                               tooltip="SoftREPA logit scale s (official 4)."),
                io.Float.Input("gamma_pos", default=d.gamma_pos, min=0.0, max=10.0, step=0.05,
                               tooltip="AGSM gamma+ (official 1)."),
                io.Float.Input("gamma_neg", default=d.gamma_neg, min=-1.0, max=10.0, step=0.05,
                               tooltip="AGSM gamma-; -1 = official (1 for SD1.5/SDXL, 0.1 for SD3)."),
                io.Float.Input("ema_decay", default=d.ema_decay, min=0.0, max=1.0, step=0.0001,
                               tooltip="AGSM EMA decay of the target tokens (official 0.9999)."),
                # Not named "seed": the frontend would add a randomize-after-run control, and a resumed
                # run must keep its seed.
                io.Int.Input("training_seed", display_name="seed", default=d.seed, min=0, max=2**31 - 1,
                             tooltip="Seeds the tokens, timesteps, noise and data order: same seed, same tokens."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="auto",
                               tooltip="auto: the model's own dtype. bf16: autocast the frozen model to bfloat16 "
                                       "(tokens stay fp32)."),
                io.Boolean.Input("gradient_checkpointing", default=False,
                                 tooltip="Recompute the model's activations in backward: much less memory, ~30% "
                                         "slower. Same result."),
                io.Float.Input("validation_fraction", default=0.1, min=0.0, max=0.9, step=0.01,
                               tooltip="Share of the images held out to measure the alignment score during "
                                       "training (0 = no validation)."),
                io.Int.Input("validate_every", default=100, min=1, max=100_000,
                             tooltip="Steps between validations; also the learning-rate schedule's step."),
                io.Int.Input("save_every", default=100, min=0, max=100_000,
                             tooltip="Steps between checkpoints (0 = only at the end). Cancel and errors always "
                                     "save."),
                io.String.Input("output_name", default="soft_tokens",
                                tooltip="Name of the run in models/soft_tokens. An existing name gets a number "
                                        "(_001, ...); nothing is overwritten."),
                io.Combo.Input("resume", options=_resume_options(), default=NO_RESUME,
                               tooltip="Continue a run from its checkpoint (*.ckpt.pt) in models/soft_tokens "
                                       "with the same settings; set steps to the new total."),
            ],
            outputs=[io.Model.Output(tooltip="The model with the trained tokens."),
                     SoftTokensType.Output(display_name="soft_tokens"),
                     io.LossMap.Output(display_name="history", tooltip="Loss and validation scores per step "
                                                                        "(works with Plot Loss Graph too).")],
        )

    @classmethod
    def validate_inputs(cls, output_name, resume):
        try:
            if resume == NO_RESUME:
                output_path(token_folder(), output_name)
            elif resume not in list_checkpoints():
                return f"checkpoint {resume!r} was not found in models/soft_tokens"
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, model, dataset, method, steps, batch, chunk, learning_rate, tokens, blocks, time_table, init,
                tau, scale, gamma_pos, gamma_neg, ema_decay, training_seed, precision, gradient_checkpointing,
                validation_fraction, validate_every, save_every, output_name, resume) -> io.NodeOutput:
        settings = RunSettings(method=method, steps=steps, batch=batch, chunk=chunk, lr=learning_rate, tokens=tokens,
                               blocks=blocks, time_table=time_table, init=init, tau=tau, scale=scale,
                               gamma_pos=gamma_pos, gamma_neg=gamma_neg, ema_decay=ema_decay, seed=training_seed,
                               precision=precision, gradient_checkpointing=gradient_checkpointing,
                               val_fraction=validation_fraction, val_every=validate_every, save_every=save_every)
        ckpt = None if resume == NO_RESUME else resolve_token_file(resume)
        files = run_files(token_folder(), output_name, resume=ckpt)
        plan = check_run(model, dataset, settings, files, resume=ckpt)  # every input error before heavy work
        progress = LiveProgress(steps)
        with torch.inference_mode(False):
            result = train_on_model(model, dataset, plan, on_step=progress.on_step)
        if progress.interrupted:  # the partial result is saved; now tell ComfyUI the run was cancelled
            raise comfy.model_management.InterruptProcessingException()
        tokens = load_tokens(files.out)
        patched = apply_soft_tokens(model, tokens, name=f"trained tokens {files.out.name}")
        text = run_summary(result, files)
        return io.NodeOutput(patched, tokens, {**history_to_loss_map(result.history), "history": result.history},
                             ui=ui.PreviewText(text))


class LiveProgress:
    """The Train node's progress bar: a live loss / score plot as preview; Cancel stops cleanly."""

    def __init__(self, total: int):
        self.bar = comfy.utils.ProgressBar(total)
        self.plot_every = max(1, total // 50)
        self.interrupted = False

    def on_step(self, step, total, loss, metrics, history=None):
        if comfy.model_management.processing_interrupted():
            self.interrupted = True
            raise Cancelled()
        preview = None
        if history is not None and (metrics or step % self.plot_every == 0 or step == total):
            preview = ("PNG", plot_history(history, title=f"step {step}/{total}"), PREVIEW_SIZE)
        try:
            self.bar.update_absolute(step, total, preview)
        except comfy.model_management.InterruptProcessingException:
            self.interrupted = True
            raise Cancelled()


def run_summary(result, files: RunFiles) -> str:
    """The Train node's UI text."""
    lines = [f"{result.stopped} at step {result.step}: {files.out.name}"]
    val = result.history.get("val") or []
    if val:
        v = val[-1]
        lines.append(f"alignment score {v['accuracy']:.3f} (without tokens {v['accuracy_base']:.3f})")
    if result.best:
        lines.append(f"best {result.best['accuracy']:.3f} at step {result.best['step']}: {files.best.name}")
    if result.stopped == "nan":
        lines.append("stopped: the loss was not finite several steps in a row; the last good tokens were saved")
    lines.append(f"resume from {files.ckpt.name}")
    return "\n".join(lines)


class SaveSoftTokens(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SaveSoftTokens",
            display_name="Save Soft Tokens",
            category=CATEGORY,
            description="Writes soft tokens to models/soft_tokens as a .safetensors file with their layout and "
                        "training record. Never overwrites: an existing name gets a number.",
            is_output_node=True,
            inputs=[SoftTokensType.Input("soft_tokens"),
                    io.String.Input("filename", default="my_tokens",
                                    tooltip="File name in models/soft_tokens (sub-folders allowed).")],
            outputs=[],
        )

    @classmethod
    def validate_inputs(cls, filename):
        try:
            output_path(token_folder(), filename)
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, soft_tokens, filename) -> io.NodeOutput:
        path = save_new(soft_tokens, token_folder(), filename)
        rel = os.path.relpath(path, token_folder()).replace(os.sep, "/")
        return io.NodeOutput(ui=ui.PreviewText(f"saved {rel} ({soft_tokens.layout.describe()})"))


def save_new(tokens, folder, name: str):
    """Save ``tokens`` as ``name`` in ``folder``, numbered instead of overwriting an existing file."""
    path = output_path(folder, name)
    if path.exists():
        path = numbered_run(folder, name.removesuffix(".safetensors"))
    return save_tokens(tokens, path, overwrite=False)


class SoftTokenAlignmentScore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SoftTokenAlignmentScore",
            display_name="Soft Token Alignment Score",
            category=CATEGORY,
            description="How often each image's own caption explains it best among a few candidates (a diffusion "
                        "classifier), with and without the tokens. Higher is better; use held-out images.",
            is_output_node=True,
            inputs=[io.Model.Input("model", tooltip="The model without soft tokens."),
                    SoftTokensType.Input("soft_tokens"),
                    SoftTokenDataset.Input("dataset", tooltip="Held-out images, encoded with this model's CLIP and "
                                                              "VAE."),
                    io.Int.Input("pairs", default=64, min=2, max=100_000, tooltip="Image-caption pairs scored."),
                    io.Int.Input("group", default=4, min=2, max=64,
                                 tooltip="Candidate captions per image (chance = 1/group)."),
                    io.Int.Input("noise_seed_value", display_name="seed", default=0, min=0, max=2**31 - 1,
                                 tooltip="Seed of the fixed noise.")],
            outputs=[io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, model, soft_tokens, dataset, pairs, group, noise_seed_value) -> io.NodeOutput:
        check_fits(model, soft_tokens, "soft tokens")
        dataset.check_model(model)
        n = min(pairs, dataset.dataset.n_images)
        if n < group:
            raise ValueError(f"the score needs at least {group} images (one group of candidates); the dataset "
                             f"has {dataset.dataset.n_images}")
        backend = ComfyBackend(model, soft_tokens)
        with torch.inference_mode(False), backend.session():
            x0, cond = val_pairs(dataset, dataset.dataset, n, model.model.process_latent_in)
            with torch.no_grad():
                s = alignment_score(backend, soft_tokens, x0, cond, group=group, seed=noise_seed_value)
        text = format_score(s)
        return io.NodeOutput(text, ui=ui.PreviewText(text))


class PlotSoftTokenTraining(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PlotSoftTokenTraining",
            display_name="Plot Soft-Token Training",
            category=CATEGORY,
            description="The training history as an image: loss and validation alignment score over steps.",
            is_output_node=True,
            inputs=[io.LossMap.Input("history", tooltip="The history output of Train Soft Tokens.")],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, history) -> io.NodeOutput:
        if "history" not in history:
            raise ValueError("this history does not come from Train Soft Tokens (no per-step records)")
        img = plot_history(history["history"])
        image = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
        return io.NodeOutput(image, ui=ui.PreviewImage(image, cls=cls))


NODES = [LoadCaptionedImages, EncodeSoftTokenDataset, TrainSoftTokens, SaveSoftTokens, SoftTokenAlignmentScore,
         PlotSoftTokenTraining]
