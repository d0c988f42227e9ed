"""Tests of the training runtime: tiny models really trained on CPU."""
