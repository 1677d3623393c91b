"""How Ember is served: the Gradio demo (app.py, the page, over releases_served.py, the models it
serves; both need only the model and the release registry) and the Prefect serve script with the
build, retrain, watch and demo deployments."""
