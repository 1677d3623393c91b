"""The pipeline's stages: plain functions over files, runnable without Prefect.

Start with stage.py (the contract every stage follows, and how a stage meets the store) and
stages.py (the order). Small stages are a module each; large ones are packages (download/,
filter/, dedup/, train/, publish/) whose `stage.py` is the stage and whose other modules are its
helpers. shard_stage.py is the base of the per-document stages; text.py what they agree on.
"""
