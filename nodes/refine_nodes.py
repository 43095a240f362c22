"""Step-selected refinement nodes (STEP_SELECTION.md): subjects encoder, SAMPLER wrapper, KSampler.

- CLIP Text Encode (Refinement Subjects): encodes like core CLIPTextEncode and attaches the
  subjects' token positions to the conditioning.
- Step-Selected Refinement: wraps any SAMPLER; at one chosen step the latent is refined with the
  gradient of an attention loss on the conditional prompt (IterRef), then the sampler goes on.
- KSampler (Step-Selected Refinement): core KSampler's inputs plus the refinement settings.

The machinery is in nodes/refine_capture.py; the maps, losses and loop in training/.
"""

from __future__ import annotations

import comfy.sample
import comfy.samplers
import comfy.utils
from comfy_api.latest import io

from ..training.attention_maps import LOSSES, parse_subjects
from ..training.refine import RefineSettings
from .refine_capture import DEFAULT_DOWNSCALE, RefinementSampler, attach_subjects, subject_info

CATEGORY = "sampling/soft tokens"

REFINE_AT_TOOLTIP = ("Where sampling pauses for the refinement, as a fraction of the sampler's schedule "
                     "(step = round(refine_at x steps)). -1 = the spec's default for the model: 0.16 for SD1.x/SDXL "
                     "(step 8 of 50, t = 821, the paper's optimum) and 5/28 for SD3 (step 5 of 28, t ~ 930; the "
                     "paper's SD3 step is not published, this is the authors' follow-up choice).")
REFINE_STEP_TOOLTIP = "A step index (0 = the first step) that overrides refine_at when >= 0. -1 = use refine_at."
ITERATIONS_TOOLTIP = ("Gradient steps on the latent at the chosen step (IterRef). Each costs one conditional "
                      "forward and backward. 0 = no refinement (output identical to the plain sampler).")
STEP_SIZE_TOOLTIP = ("Attend-and-Excite's scale factor: the latent moves by scale x sqrt(linspace(1, 0.5, steps)[step]) "
                     "times the loss gradient per iteration. 20 = the official default.")
LOSS_TOOLTIP = ("cn: every subject gets a strong attention peak (fights missing subjects). iou: the subjects' "
                "attention overlaps less (fights mixed subjects). cn+iou: their mean (the official combination).")
SMOOTHING_TOOLTIP = "Gaussian 3x3 smoothing of the subject attention maps before the loss (official default: on)."
DOWNSCALE_TOOLTIP = ("SD1.x/SDXL only: attention maps are read from the cross-attention layers at latent size / this "
                     "(4 = 16x16 for SD1.5 at 512 px, the official choice; 32x32 for SDXL at 1024 px). SD3 always uses "
                     "its 2x2 patch grid.")


def refinement_inputs(optional_extras: bool = False) -> list:
    extras = [
        io.Boolean.Input("smoothing", default=True, optional=optional_extras, tooltip=SMOOTHING_TOOLTIP),
        io.Int.Input("attention_downscale", default=DEFAULT_DOWNSCALE, min=1, max=64, optional=optional_extras,
                     tooltip=DOWNSCALE_TOOLTIP),
        io.Int.Input("refine_step", default=-1, min=-1, max=10000, optional=optional_extras,
                     tooltip=REFINE_STEP_TOOLTIP),
    ]
    return [
        io.Float.Input("refine_at", default=-1.0, min=-1.0, max=1.0, step=0.01, tooltip=REFINE_AT_TOOLTIP),
        io.Int.Input("iterations", default=20, min=0, max=1000, tooltip=ITERATIONS_TOOLTIP),
        io.Float.Input("step_size", default=20.0, min=0.0, max=1000.0, step=0.5, tooltip=STEP_SIZE_TOOLTIP),
        io.Combo.Input("loss", options=list(LOSSES), default="cn+iou", tooltip=LOSS_TOOLTIP),
        *extras,
    ]


def make_sampler(sampler, refine_at, iterations, step_size, loss, smoothing=True, attention_downscale=DEFAULT_DOWNSCALE,
                 refine_step=-1) -> RefinementSampler:
    settings = RefineSettings(iterations=int(iterations), loss=loss, scale=float(step_size), smoothing=bool(smoothing))
    return RefinementSampler(sampler, settings, refine_at=float(refine_at), refine_step=int(refine_step),
                             downscale=int(attention_downscale))


class EncodeWithSubjects(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SoftTokensEncodeWithSubjects",
            display_name="CLIP Text Encode (Refinement Subjects)",
            category="conditioning/soft tokens",
            description="Encodes a prompt exactly like CLIP Text Encode and remembers where its subject words are, "
                        "for the Step-Selected Refinement samplers.",
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP of an SD1.x, SD2, SDXL or SD3 checkpoint."),
                io.String.Input("text", multiline=True, dynamic_prompts=True,
                                tooltip="The prompt, e.g. 'a photo of a cat and a dog'."),
                io.String.Input("subjects", default="",
                                tooltip="The prompt's subject words, separated by commas (e.g. 'cat, dog'). Each must "
                                        "appear in the prompt (in the first 75 tokens); multi-word subjects are fine."),
            ],
            outputs=[io.Conditioning.Output(tooltip="The prompt's conditioning, carrying the subjects' positions.")],
        )

    @classmethod
    def execute(cls, clip, text, subjects) -> io.NodeOutput:
        if clip is None:
            raise RuntimeError("ERROR: clip input is invalid: None\n\nIf the clip is from a checkpoint loader node "
                               "your checkpoint does not contain a valid clip or text encoder model.")
        words = parse_subjects(subjects)
        tokens = clip.tokenize(text)
        subject_info(clip, tokens, words)  # unknown subjects fail before encoding
        conditioning = clip.encode_from_tokens_scheduled(tokens)
        info = subject_info(clip, tokens, words, n_text=conditioning[0][0].shape[1])
        return io.NodeOutput(attach_subjects(conditioning, info))


class StepSelectedRefinement(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="StepSelectedRefinement",
            display_name="Step-Selected Refinement",
            category=CATEGORY,
            description="Wraps a sampler: sampling pauses at one chosen step, the latent is refined so that every "
                        "subject gets attention (Attend-and-Excite losses, iterated at a single step), and the same "
                        "sampler continues. Use with SamplerCustomAdvanced; the positive prompt must come from "
                        "CLIP Text Encode (Refinement Subjects). SD1.x, SD2, SDXL and SD3.",
            inputs=[io.Sampler.Input("sampler", tooltip="The sampler to wrap, e.g. from KSamplerSelect."),
                    *refinement_inputs()],
            outputs=[io.Sampler.Output(tooltip="The sampler with the refinement step.")],
        )

    @classmethod
    def execute(cls, sampler, refine_at, iterations, step_size, loss, smoothing=True,
                attention_downscale=DEFAULT_DOWNSCALE, refine_step=-1) -> io.NodeOutput:
        return io.NodeOutput(make_sampler(sampler, refine_at, iterations, step_size, loss, smoothing,
                                          attention_downscale, refine_step))


class KSamplerStepSelectedRefinement(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KSamplerStepSelectedRefinement",
            display_name="KSampler (Step-Selected Refinement)",
            category=CATEGORY,
            description="KSampler with step-selected refinement: at one chosen step the latent is refined so that "
                        "every subject of the positive prompt (from CLIP Text Encode (Refinement Subjects)) gets "
                        "attention, then sampling continues. With iterations 0 it equals the core KSampler.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x, SD2, SDXL or SD3 model (soft tokens welcome)."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The random seed used for creating the noise."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="The number of denoising steps."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (the refinement itself uses the positive "
                                       "prompt alone)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES,
                               tooltip="The sampling algorithm. Single-evaluation samplers (euler, euler_ancestral, "
                                       "dpmpp_2m, ...) refine exactly the state at the chosen step."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES,
                               tooltip="How the noise levels are spread over the steps."),
                io.Conditioning.Input("positive", tooltip="From CLIP Text Encode (Refinement Subjects)."),
                io.Conditioning.Input("negative", tooltip="The negative prompt (any conditioning)."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="How much of the schedule runs (refine_at counts in the steps that run)."),
                *refinement_inputs(optional_extras=True),
            ],
            outputs=[io.Latent.Output(tooltip="The denoised latent.")],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                refine_at, iterations, step_size, loss, smoothing=True, attention_downscale=DEFAULT_DOWNSCALE,
                refine_step=-1) -> io.NodeOutput:
        import latent_preview

        latent = latent_image
        samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
        ks = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                     scheduler=scheduler, denoise=denoise, model_options=model.model_options)
        sampler = make_sampler(comfy.samplers.sampler_object(sampler_name), refine_at, iterations, step_size, loss,
                               smoothing, attention_downscale, refine_step)
        callback = latent_preview.prepare_callback(model, steps)
        out = comfy.sample.sample_custom(model, noise, cfg, sampler, ks.sigmas, positive, negative, samples,
                                         noise_mask=latent.get("noise_mask"), callback=callback,
                                         disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        result = latent.copy()
        result["samples"] = out
        return io.NodeOutput(result)


NODES = [EncodeWithSubjects, StepSelectedRefinement, KSamplerStepSelectedRefinement]
