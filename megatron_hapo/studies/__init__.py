"""Scaling studies: a study file (sizes x algorithms x seeds), its cells laid out, launched and collected."""
