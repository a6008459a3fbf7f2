"""Experiment layer: `gradmap compare` (method strings, runs, reports, plots), on top of the API."""
