"""RDA, reorganisation data augmentation: offline caption enrichment (`icl rda`,
icl.rda.pipeline) and online reorganisation during training (icl.rda.reorganise)."""
