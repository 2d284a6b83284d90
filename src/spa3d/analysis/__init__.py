"""Measures of results: agreement of classifications, map quality."""
