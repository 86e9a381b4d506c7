"""The paper's experiments, built on the library: ``ecoptim compare`` and ``ecoptim finetune``.

A byte-level Llama model (``model``), a small transformers Qwen3-MoE for ``finetune --arch qwen3-moe`` (``moe``;
needs transformers), two embedded text corpora (``corpus``, data in ``corpora/``), the training runs with the
paper's recipe (``train``), the plots (``plots``) and the command line (``cli``).
The library core (``ecoptim`` outside this package) imports nothing from here; the app's own dependencies
(tqdm, matplotlib) come with the ``app`` extra: ``pip install "ecoptim[app]"``.
"""
