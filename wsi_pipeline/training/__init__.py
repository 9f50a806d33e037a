"""MIL training and inference on feature bags: bags, CV splits, trainer, metrics, checkpoints.

Submodules are imported by name (`from wsi_pipeline.training.checkpoints import load_ensemble`);
this package imports nothing itself, so `bags`, `splits` and `metrics` stay usable without torch
being loaded and the CLI starts fast.

- bags:        load_bag(path) -> (features (N, D) float32, coords (N, k) int64 (k = 2 or 3), attrs)
- bag_source:  BagSource / BagSet: bags read from disk per pass, bounded LRU cache, reader-thread prefetch
- splits:      patient-level stratified k-fold + inner validation split, splits.json
- trainer:     train_fold (AdamW, CE, early stopping), predict_probs
- metrics:     AUC, balanced accuracy, macro F1 with bootstrap 95% CIs
- checkpoints: save_fold_model / load_fold_model / load_ensemble (safetensors only)
- runs:        training run ids; check_ensemble (folds from one run, none missing vs splits.json)
- inference:   ensemble_predict over fold models -> EnsembleOutput
"""
