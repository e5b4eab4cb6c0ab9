"""Contribution math on NumPy arrays: DIG-FL (``digfl``) and Shapley (``shapley``)."""
