"""Training data over episode stores: sample weights by control label, memory budgets, windows."""
