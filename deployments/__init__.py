"""How Ember is served: the Gradio demo (app.py, which needs only the model and the release
registry) and the Prefect serve script with the build, retrain, watch and demo deployments."""
