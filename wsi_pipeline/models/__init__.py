"""Model registries: MIL aggregators (`models.mil`), later segmenters and detectors. Tensors in,
tensors out — models never see slides or paths."""
