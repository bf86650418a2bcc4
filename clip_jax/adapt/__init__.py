"""Few-shot adaptation of a trained CLIP: CoOp, CoCoOp, CLIP-Adapter, Tip-Adapter(-F)."""
