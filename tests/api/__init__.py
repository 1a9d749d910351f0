"""Tests of the entry points (lens_alti.api): attribute, logit_attribution, routes, their inputs and errors."""
