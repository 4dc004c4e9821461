"""Callbacks: the data epoch (set at epoch boundaries), step seeds, export, evaluation, negative refresh, plots."""
