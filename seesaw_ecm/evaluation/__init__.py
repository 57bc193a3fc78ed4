"""LVIS evaluation: a fast, lean backend equal to the official `lvis` API (`lvis_fast`, no
detectron2) and the Detectron2 evaluator that uses it (`evaluator`)."""
