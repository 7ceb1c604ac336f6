"""Inference chains: how the features of one layer build those of the next, up to the answer.

    stack.py      SAEStack: SAEs on residual hooks of one model, in layer order; the per-layer report
"""
