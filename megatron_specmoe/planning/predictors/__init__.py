"""Route predictors: guess, before the gate, which experts (and so which EP rank) a token will use.

Every predictor implements ``RoutePredictor`` (``base.py``). Import the concrete modules you need.
"""
