"""Training, evaluation and visualisation of BEV models."""
