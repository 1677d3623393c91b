"""Where everything is kept, and the file formats the layers above share: the content-addressed
artifact store (store.py), text shards (shards.py), token shards (tokens.py) and the release
registry (releases.py). Imports nothing of Ember's, and neither Prefect nor torch."""
