"""LVIS evaluation: a fast, lean backend equal to the official `lvis` API (`lvis_fast`, no
detectron2) and the Detectron2 evaluator that uses it (`FastLVISEvaluator`, in `evaluator`)."""
try:
    import detectron2  # noqa: F401
except ImportError:  # lvis_fast alone works without detectron2
    __all__ = []
else:
    from .evaluator import FastLVISEvaluator

    __all__ = ["FastLVISEvaluator"]
