"""``sparseflash.train``: a small GPT trained with our attentions, after nanoGPT.

* :mod:`.model`: the GPT, its attention picked by name (ours: dense / hash / qk; PyTorch's
  SDPA with the FlashAttention-2 or cuDNN backend; none).
* :mod:`.data`: preparing a byte-level corpus once (``python -m sparseflash.train.data
  prepare``) and cutting batches from it.
* :mod:`.loop`: the training loop (schedule, validation, checkpoints that resume exactly,
  DDP under ``torchrun``, the JSON log); ``python -m sparseflash.train`` runs it.
* :mod:`.experiment`: the speed and loss comparison (``python -m sparseflash.train.experiment``).
* :mod:`.exercises`: the checkers of notebook 07.
"""
