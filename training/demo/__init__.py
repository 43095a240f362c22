"""The embedded demo world: synthetic captioned images, GenEval-mini, and a tiny text-to-image model.

Modules: ``world`` (generator, captions, splits, specs), ``geneval_mini`` (evaluator),
``textenc`` (tokenizer, text encoder), ``pretrain`` (recipe, shipping, loading, DDIM sampling).
The main entry points are re-exported lazily, so importing the package stays torch-only:
``load_tiny_t2i``, ``sample``, ``evaluate_model`` (pretrain) and ``evaluate`` (geneval_mini).
"""

_EXPORTS = {"load_tiny_t2i": "pretrain", "sample": "pretrain", "evaluate_model": "pretrain",
            "images_to_latents": "pretrain", "latents_to_images": "pretrain", "evaluate": "geneval_mini"}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
