"""Compression, each step recovered by distillation (issue 11).

  prune.py      structured pruning: depth (Block Influence, ShortGPT) and width (MLP neurons, attention heads /
                KV groups; Minitron-style activation importance), weights physically sliced into a smaller model
  sparsity.py   unstructured pruning: magnitude, Wanda, N:M (2:4) masks, enforced while the model trains
  quantize.py   weight-only post-training quantization (int8, int4 group-wise): torchao where it works, else a
                plain fake-quant fallback, behind one small `quantize_(model, config)` interface
  qat.py        quantization-aware training: fake-quantized linear layers (straight-through estimator), then
                converted
  calibration.py  calibration batches from tokenized examples (the pieces every scorer shares)
"""
