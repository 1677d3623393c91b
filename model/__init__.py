"""The language model, in plain PyTorch: the transformer (transformer.py), its tokenizer as
readers load it (tokenizer.py), generation with a KV cache (generate.py), the CPU decoding layout
(decoding.py), scoring (scoring.py), int8 (quantize.py), checkpoints and HF/GGUF export. Imports
nothing of Ember's other layers, and not Prefect."""
