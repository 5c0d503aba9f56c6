"""Training: experiment configs, data, the train step and the train_and_evaluate loop."""
