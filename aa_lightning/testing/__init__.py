"""Test fixtures shipped inside the package: tiny random models of real architectures.

They live in the library (as ``torch.testing`` or ``lightning.pytorch.demos`` do) because the ``tiny-*`` model
aliases of ``configs/tiny/*.yaml`` and the notebooks are built from them at run time, so they must be
importable from an installed package, not only from ``tests/``.

- :mod:`.tiny_common`: the shared tokenizer, model shape and save step;
- :mod:`.tiny_text`: tiny Llama and Qwen2;
- :mod:`.tiny_multimodal`: tiny LLaVA, Qwen2-VL and Qwen2-Audio with real processors;
- :mod:`.tiny_builders`: the alias -> builder table that :mod:`aa_lightning.models.aliases` resolves.
"""
